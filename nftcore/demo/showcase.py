"""What `python -m nftcore.train` adds around a demo run: the base model's evaluation before training, the final
(EMA) model's after it, a before/after summary, and two pictures under the run folder:

- `reward_curve.png`: rollout reward per epoch (raw and smoothed), the base / final / periodic eval rewards;
- `before_after.png`: source | base edit | trained edit | target on the first held-out tasks (fixed noise), each row
  captioned with its instruction and both scores.

The summary gives both means with their standard errors, the paired difference, and the same per task type
(recolour / remove / move), so a reader sees which kinds of edit the training fixed.

The trainer is used through its public surface only (`evaluate`, `train`, `last_eval`, `metrics`, `family`, `env`),
so the demo does not import the trainer (the trainer imports the demo's family).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nftcore.demo.plots import save_reward_curve
from nftcore.utils.images import save_image_grid

GRID_ROWS = 8  # eval tasks shown in before_after.png


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n; nan for fewer than two values)."""
    values = values.double()
    n = values.numel()
    mean = float(values.mean()) if n else math.nan
    return mean, (float(values.std() / math.sqrt(n)) if n > 1 else math.nan)


def summary_lines(base: Any, final: Any, kind_of: Any) -> list[str]:
    """The before/after table: `base`, `final` are evaluation results (`reward`, per-sample `scores`, split
    `indices`), `kind_of(index)` names a sample's task type. Differences are paired over the samples both scored."""
    b = dict(zip(base.indices.tolist(), base.scores.tolist()))
    f = dict(zip(final.indices.tolist(), final.scores.tolist()))
    common = sorted(b.keys() & f.keys())

    def row(label: str, indices: list[int]) -> str:
        bm, be = mean_and_error(torch.tensor([b[i] for i in indices]))
        fm, fe = mean_and_error(torch.tensor([f[i] for i in indices]))
        dm, de = mean_and_error(torch.tensor([f[i] - b[i] for i in indices]))
        return (f"#   {label:<10} {len(indices):>4}   {bm:.3f} ± {be:.3f}   {fm:.3f} ± {fe:.3f}   "
                f"{dm:+.3f} ± {de:.3f}")

    kinds: dict[str, list[int]] = {}
    for i in common:
        kinds.setdefault(kind_of(i), []).append(i)
    return ([f"# eval on {len(common)} held-out tasks (± standard error; difference paired per task):",
             "#   task type     n   base            trained (EMA)   difference", row("all", common)]
            + [row(kind, indices) for kind, indices in sorted(kinds.items())])


class Showcase:
    """`before()` evaluates the base model, `after(result)` the final one, prints the summary and writes the
    pictures to `out`."""

    def __init__(self, trainer: Any, out: Path):
        self.trainer, self.out = trainer, Path(out)
        self.base = None

    def before(self) -> None:
        self.base = self.trainer.evaluate("base")
        self.trainer.metrics.info(f"# base model: eval reward {self.base.reward:.4f}")

    def after(self, result: dict[str, Any]) -> None:
        trainer = self.trainer
        last = trainer.last_eval  # the loop's own evaluation after the last epoch, when it made one
        final = last[1] if last and last[0] == result["epoch"] else trainer.evaluate("ema")
        trainer.metrics.info(f"# final (EMA) model: eval reward {final.reward:.4f} (base {self.base.reward:.4f}); "
                             f"rollout reward by epoch {[round(r, 4) for r in result['epoch_rewards']]}")
        fam = trainer.family
        for line in summary_lines(self.base, final, lambda i: fam.eval_dataset[i].task.edit):
            trainer.metrics.info(line)
        if not trainer.env.is_main:
            return
        rows = min(GRID_ROWS, self.base.images.shape[0])
        samples = [fam.eval_dataset[i] for i in range(rows)]
        curve, grid = self.out / "reward_curve.png", self.out / "before_after.png"
        drawn = save_reward_curve(curve, result["epoch_rewards"], self.base.reward, final.reward,
                                  result["eval_rewards"])
        scores = [{i: s for i, s in zip(r.indices.tolist(), r.scores.tolist())} for r in (self.base, final)]
        captions = [f"{s.prompt}   base {scores[0].get(i, math.nan):.2f} -> trained {scores[1].get(i, math.nan):.2f}"
                    for i, s in enumerate(samples)]
        save_image_grid(grid, fam.source_images(samples).cpu(), self.base.images[:rows], final.images[:rows],
                        fam.target_images(samples), headers=["source", "base", "trained", "target"],
                        captions=captions)
        print(f"# wrote {grid}" + (f" and {curve}" if drawn else " (reward_curve.png needs matplotlib)"))
