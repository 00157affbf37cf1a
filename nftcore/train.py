"""`python -m nftcore.train [--config RECIPE|FILE.toml] [--resume latest|PATH] [--section.key=value ...]`

nftcore's main job. With no arguments it runs the embedded `demo` recipe end to end on the CPU: the pretrained demo
policy is RL-trained against the demo world's exact verifier, the reward is printed per epoch, and under `--run.out`
(default runs/demo) it leaves metrics.jsonl, checkpoints/, reward_curve.png and before_after.png
(source | base edit | final edit | target, on held-out tasks with fixed noise).

Under torchrun (`torchrun --nproc_per_node=N -m nftcore.train --config ...`) every rank runs this; only rank 0 prints
and writes files.
"""

from __future__ import annotations

import sys
import time

from nftcore.config import ConfigError, load_config
from nftcore.trainer import Trainer, init_distributed, shutdown
from nftcore.trainer.metrics import save_before_after, save_reward_curve

GRID_ROWS = 8  # eval tasks shown in before_after.png


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"nftcore.train: {err}", file=sys.stderr)
        return 2
    env = init_distributed(cfg)
    try:
        start = time.perf_counter()
        try:
            trainer = Trainer(cfg, env=env)
        except FileNotFoundError as err:  # e.g. the demo's base checkpoint is not there
            print(f"nftcore.train: {err}", file=sys.stderr)
            return 1
        demo = cfg.model.family == "demo" and cfg.eval.every > 0  # eval.every = 0: no evaluation, no pictures
        if demo:
            base_reward, base_images = trainer.evaluate("base")
            trainer.metrics.info(f"# base model: eval reward {base_reward:.4f}")
        result = trainer.train()
        if demo:
            last = trainer.last_eval  # the loop's own evaluation after the last epoch, when it made one
            final_reward, final_images = (last[1:] if last and last[0] == result["epoch"] else trainer.evaluate("ema"))
            trainer.metrics.info(f"# final (EMA) model: eval reward {final_reward:.4f} (base {base_reward:.4f}); "
                                 f"rollout reward by epoch {[round(r, 4) for r in result['epoch_rewards']]}")
            if env.is_main:
                fam = trainer.family
                rows = min(GRID_ROWS, base_images.shape[0])
                samples = [fam.eval_dataset[i] for i in range(rows)]
                out = cfg.run.metrics_path.parent
                save_reward_curve(out / "reward_curve.png", result["epoch_rewards"], base_reward, final_reward,
                                  result["eval_rewards"])
                save_before_after(out / "before_after.png", fam.source_images(samples).cpu(), base_images[:rows],
                                  final_images[:rows], fam.target_images(samples))
                print(f"# wrote {out / 'reward_curve.png'} and {out / 'before_after.png'}")
        trainer.metrics.info(f"# done: {result['epoch']} epochs, {result['step']} steps in "
                             f"{time.perf_counter() - start:.1f} s")
    finally:
        shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
