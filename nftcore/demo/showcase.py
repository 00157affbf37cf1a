"""What `python -m nftcore.train` adds around a demo run: the base model's evaluation before training, the final
(EMA) model's after it, and the two pictures under the run folder:

- `reward_curve.png`: rollout reward per epoch, its moving average, the base / final / periodic eval rewards;
- `before_after.png`: source | base edit | final edit | target on the first held-out tasks, with fixed noise.

The trainer is used through its public surface only (`evaluate`, `train`, `last_eval`, `metrics`, `family`, `env`),
so the demo does not import the trainer (the trainer imports the demo's family).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nftcore.demo.plots import save_reward_curve
from nftcore.utils.images import save_image_grid

GRID_ROWS = 8  # eval tasks shown in before_after.png


class Showcase:
    """`before()` evaluates the base model, `after(result)` the final one and writes the pictures to `out`."""

    def __init__(self, trainer: Any, out: Path):
        self.trainer, self.out = trainer, Path(out)
        self.base_reward, self.base_images = float("nan"), None

    def before(self) -> None:
        self.base_reward, self.base_images = self.trainer.evaluate("base")
        self.trainer.metrics.info(f"# base model: eval reward {self.base_reward:.4f}")

    def after(self, result: dict[str, Any]) -> None:
        trainer = self.trainer
        last = trainer.last_eval  # the loop's own evaluation after the last epoch, when it made one
        final_reward, final_images = (last[1:] if last and last[0] == result["epoch"] else trainer.evaluate("ema"))
        trainer.metrics.info(f"# final (EMA) model: eval reward {final_reward:.4f} (base {self.base_reward:.4f}); "
                             f"rollout reward by epoch {[round(r, 4) for r in result['epoch_rewards']]}")
        if not trainer.env.is_main:
            return
        fam = trainer.family
        rows = min(GRID_ROWS, self.base_images.shape[0])
        samples = [fam.eval_dataset[i] for i in range(rows)]
        curve, grid = self.out / "reward_curve.png", self.out / "before_after.png"
        save_reward_curve(curve, result["epoch_rewards"], self.base_reward, final_reward, result["eval_rewards"])
        save_image_grid(grid, fam.source_images(samples).cpu(), self.base_images[:rows], final_images[:rows],
                        fam.target_images(samples))
        print(f"# wrote {curve} and {grid}")
