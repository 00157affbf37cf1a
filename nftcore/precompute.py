"""`python -m nftcore.precompute --config RECIPE|FILE.toml [--batch-size N] [--section.key=value ...]`

Fills the disk conditioning cache (`data.cache_conditioning = disk`, folder `data.cache_dir`, default
OUT/conditioning_cache) for every row of the train split and of the eval split if the dataset has one, with the
options `python -m nftcore.train` takes (the same recipe, file and overrides give the same cache keys). Only the
frozen VAE and text encoders are loaded, not the policy transformer. A training run of that config with
`--data.cache_conditioning=disk` then finds every row and does not load the text encoders at all.

Rows are encoded `--batch-size` at a time (default sampling.batch_size); entries already valid (identity, content,
checksum and shapes all check) are left alone, stale or corrupt ones are rewritten. Under torchrun each rank takes
one contiguous slice of each split; every rank makes the same number of encoder calls, so sharded text encoders
(`parallel.shard_text_encoder`) work too. Rank 0 shows a progress line per split and a summary: rows encoded, rows
already valid, bytes written.

Errors end the job with one line, `nftcore.precompute: <message>` on stderr: exit code 2 for a bad option or a
config the family cannot use, 1 for a missing model or dataset, an unreadable image (unless data.bad_lines = skip,
which skips and counts it) or a cache folder that cannot be written.

See docs/TRAINING.md, "Cached conditioning".
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from nftcore.config import ConfigError, load_config
from nftcore.data import DatasetError, ImageDecodeError
from nftcore.trainer.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown

PROG = "python -m nftcore.precompute"
USAGE = f"usage: {PROG} [--config RECIPE|FILE.toml] [--batch-size N] [--SECTION.KEY=VALUE ...] [-h]"
CONFIG_EXIT, RUNTIME_EXIT = 2, 1
RUNTIME_ERRORS = (FileNotFoundError, DatasetError, OSError)


def report(error: BaseException, code: int, is_main: bool) -> int:
    if is_main:
        sys.stdout.flush()
        print(f"nftcore.precompute: {error}", file=sys.stderr, flush=True)
    return code


def take_batch_size(argv: list[str]) -> tuple[list[str], int | None]:
    """argv without `--batch-size N` / `--batch-size=N`, and N (None when absent)."""
    rest, size, i = [], None, 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name, has_value, value = token.partition("=")
        if name.replace("_", "-") != "--batch-size":
            rest.append(token)
            continue
        if not has_value:
            if i == len(argv):
                raise ConfigError("--batch-size needs a value (rows per encoder call)")
            value, i = argv[i], i + 1
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ConfigError(f"--batch-size must be an integer ≥ 1, got {value!r}")
    return rest, size


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _read(dataset, rows: list[int], pool: ThreadPoolExecutor | None, skip_unreadable: bool):
    """(samples, their rows, unreadable rows) of `rows`; with `skip_unreadable` a row whose image fails to decode
    is left out, otherwise its ImageDecodeError stops the job."""
    def read(i: int):
        try:
            return dataset[i]
        except ImageDecodeError:
            if not skip_unreadable:
                raise
            return None

    got = list(pool.map(read, rows)) if pool is not None else [read(i) for i in rows]
    samples = [(s, i) for s, i in zip(got, rows) if s is not None]
    return [s for s, _ in samples], [i for _, i in samples], [i for s, i in zip(got, rows) if s is None]


def precompute(cfg, family, env: DistEnv, *, batch_size: int | None = None, logger=None) -> dict[str, int]:
    """Encode every row of both splits that lacks a valid entry; return the totals over ranks ("rows",
    "encoded", "valid", "unreadable", "bytes")."""
    from nftcore.trainer.conditioning_cache import ConditioningCache, directory_of
    from nftcore.trainer.metrics import MetricsLogger

    directory = directory_of(cfg)
    logger = logger or MetricsLogger(directory / ".precompute", enabled=env.is_main, progress=cfg.metrics.progress)
    cache = ConditioningCache.for_run(cfg, family, env, metrics=logger)
    size = batch_size or cfg.sampling.batch_size
    splits = [("train", family.train_dataset), ("eval", family.eval_dataset)]
    counts = {"rows": 0, "encoded": 0, "valid": 0, "unreadable": 0}
    workers = cfg.data.num_workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data") if workers else None
    try:
        for split, dataset in splits:
            if dataset is None:
                continue
            n = len(dataset)
            per = math.ceil(n / env.world_size)
            first = env.rank * per
            # A short slice is padded with copies of the split's last row (already counted where it is real), so
            # every rank makes the same number of calls: a sharded encoder's collectives must pair up.
            mine = [min(i, n - 1) for i in range(first, first + per)]
            real = set(range(first, min(first + per, n)))
            counts["rows"] += len(real)
            seen: set[int] = set()
            calls = [mine[s:s + size] for s in range(0, per, size)]
            with logger.progress(f"precompute {split} ({n} rows, {env.world_size} rank(s))", len(calls)) as bar:
                for rows in calls:
                    samples, kept, unreadable = _read(dataset, rows, pool, cfg.data.bad_lines == "skip")
                    for i in unreadable:
                        if i in real and i not in seen:
                            seen.add(i)
                            counts["unreadable"] += 1
                            logger.warn(f"{split} row {i}: unreadable image skipped (data.bad_lines=skip)",
                                        every_rank=True)
                    readable = [True] * len(samples)
                    if not samples:  # every image of the call unreadable: a stand-in keeps the call (not stored)
                        samples, kept, readable = [dataset.placeholder(rows[0])], [rows[0]], [False]
                    _, _, status = cache.resolve(samples, kept, split, readable)
                    for row, state in status.items():
                        if row in real and row not in seen:
                            seen.add(row)
                            counts["valid" if state == "reused" else "encoded"] += 1
                    bar.advance()
    finally:
        if pool is not None:
            pool.shutdown()
    names = [*counts, "bytes"]
    local = torch.tensor([*counts.values(), cache.stats["bytes_written"]], dtype=torch.float64)
    totals = all_reduce_sum(local, env).tolist()
    return {name: int(value) for name, value in zip(names, totals)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    is_main = os.environ.get("RANK", "0") == "0"
    if "-h" in argv or "--help" in argv:
        print(f"{USAGE}\n\n{__doc__.split(chr(10) * 2, 1)[1].strip()}\n\nThe options of python -m nftcore.train:\n")
    try:
        argv, batch_size = take_batch_size(argv)
        # Whatever the config says about the cache, this fills the disk one (the key does not depend on the mode).
        cfg = load_config([*argv, "--data.cache_conditioning=disk"])
    except ConfigError as err:
        return report(err, CONFIG_EXIT, is_main)
    env = init_distributed(cfg)
    try:
        from nftcore.trainer.conditioning_cache import directory_of
        from nftcore.trainer.family import build_family
        from nftcore.trainer.metrics import MetricsLogger

        start = time.perf_counter()
        try:
            family = build_family(cfg, env.device, load_transformer=False)
        except RUNTIME_ERRORS as err:
            return report(err, RUNTIME_EXIT, env.is_main)
        except (ConfigError, NotImplementedError, ValueError) as err:  # settings the family cannot honour
            return report(err, CONFIG_EXIT, env.is_main)
        directory = directory_of(cfg)
        logger = MetricsLogger(directory / ".precompute", enabled=env.is_main, progress=cfg.metrics.progress)
        try:
            totals = precompute(cfg, family, env, batch_size=batch_size, logger=logger)
        except ConfigError as err:
            return report(err, CONFIG_EXIT, env.is_main)
        except RUNTIME_ERRORS as err:
            return report(err, RUNTIME_EXIT, env.is_main)
        skipped = f", {totals['unreadable']} unreadable skipped" if totals["unreadable"] else ""
        logger.info(f"# precompute: {totals['rows']} rows, {totals['encoded']} encoded, {totals['valid']} already "
                    f"valid{skipped}; {human_bytes(totals['bytes'])} written to {directory} in "
                    f"{time.perf_counter() - start:.1f} s")
    finally:
        shutdown(env)
    return 0


if __name__ == "__main__":
    from nftcore.train import exit_process

    exit_process(main())
