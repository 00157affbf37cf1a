"""`python -m nftcore.train [--config RECIPE|FILE.toml] [--resume latest|PATH] [--section.key=value ...]`

nftcore's main job. With no arguments it runs the embedded `demo` recipe end to end on the CPU: the pretrained demo
policy is RL-trained against the demo world's exact verifier, the reward is printed per epoch, and under `--run.out`
(default runs/demo) it leaves metrics.jsonl, checkpoints/, reward_curve.png and before_after.png
(source | base edit | final edit | target, on held-out tasks with fixed noise).

Under torchrun (`torchrun --nproc_per_node=N -m nftcore.train --config ...`) every rank runs this; only rank 0 prints
and writes files.

Mistakes end the job with one line, `nftcore.train: <message>` on stderr, after whatever was printed before it
(the effective config, say), and no traceback:

- exit code 2, a config error: a bad option or value, or settings that cannot work together or on this many ranks
  (`ConfigError`: e.g. the batch plan, a `--resume` that names no checkpoint; `NotImplementedError` while the
  trainer is built: a combination not implemented yet);
- exit code 1, a file, data or checkpoint error: a missing model or dataset (`FileNotFoundError`), a bad metadata
  line or unreadable image (`DatasetError`), a damaged or unloadable checkpoint (`CheckpointError`).

Anything else is a bug or a crash and keeps its traceback. Only rank 0 prints the line (before the process group
exists, the one whose RANK is 0); the other ranks exit with the same code quietly, so N ranks that hit the same
error show it once. That suits these errors, which depend only on the config, the files and the world size, so
every rank meets the same one at the same point, before any collective or on the way to the same one, and all of
them reach `shutdown`'s barrier. An error only some ranks hit (a file missing on one node) leaves the others in
their next collective until torchrun stops the job, as any one-rank crash does, and is printed only if rank 0 is
among them: look at the other ranks' exit codes then.

Recipes and options: README.md; what the loop computes: docs/ALGORITHM.md §5; running at scale, stopping and
resuming: docs/TRAINING.md.
"""

from __future__ import annotations

import os
import sys
import time

from nftcore.config import ConfigError, load_config
from nftcore.data import DatasetError
from nftcore.demo.showcase import Showcase
from nftcore.trainer import Trainer, init_distributed, shutdown
from nftcore.trainer.checkpoint import CheckpointError
from nftcore.trainer.run_folder import prepare_run_folder

CONFIG_EXIT, RUNTIME_EXIT = 2, 1
RUNTIME_ERRORS = (FileNotFoundError, DatasetError, CheckpointError)
"""User errors found while running: files, data, checkpoints; exit code 1."""


def report(error: BaseException, code: int, is_main: bool) -> int:
    """Print `error` as the job's last line (rank 0 only) and return the exit code."""
    if is_main:
        sys.stdout.flush()  # whatever went to stdout first stays above the error line
        print(f"nftcore.train: {error}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        return report(err, CONFIG_EXIT, os.environ.get("RANK", "0") == "0")
    env = init_distributed(cfg)
    try:
        try:
            # The run folder first: a folder that holds another run is refused before any model is loaded.
            prepare_run_folder(cfg, env)
            trainer = Trainer(cfg, env=env)
        except (ConfigError, NotImplementedError) as err:  # NotImplementedError: a setting the trainer lacks
            return report(err, CONFIG_EXIT, env.is_main)
        except RUNTIME_ERRORS as err:  # e.g. the demo's base checkpoint is not there
            return report(err, RUNTIME_EXIT, env.is_main)
        try:
            run(trainer, cfg, env)
        except ConfigError as err:
            return report(err, CONFIG_EXIT, env.is_main)
        except RUNTIME_ERRORS as err:  # e.g. a damaged checkpoint, an unreadable image under data.bad_lines=error
            return report(err, RUNTIME_EXIT, env.is_main)
    finally:
        shutdown(env)
    return 0


def run(trainer: Trainer, cfg, env) -> None:
    """Train; a demo run with evaluation on also evaluates the base and final models and draws the pictures
    (`nftcore.demo.showcase`)."""
    start = time.perf_counter()
    showcase = None
    if cfg.model.family == "demo" and cfg.eval.every > 0:  # eval.every = 0: no evaluation, no pictures
        showcase = Showcase(trainer, cfg.run.metrics_path.parent)
        showcase.before()
    result = trainer.train()
    if showcase is not None:
        showcase.after(result)
    trainer.metrics.info(f"# done: {result['epoch']} epochs, {result['step']} steps in "
                         f"{time.perf_counter() - start:.1f} s")


def exit_process(code: int) -> None:
    """Exit with `code`. A torchrun worker leaves by `os._exit` once `main` has shut the process group down and
    everything is written: gloo's worker threads can still hold work objects when the interpreter finalizes, and
    destroying them then aborts the process now and then ("terminate called without an active exception"), turning
    a finished run into a failed job."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
