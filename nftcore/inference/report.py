"""What an evaluation run reports: score means (per group), a paired base-vs-trained comparison with a Student-t 95%
confidence interval, and a (source | base | trained) grid image. Pure Python + PIL: no scipy.

See docs/INFERENCE.md, "Outputs".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

__all__ = ["paired_difference", "score_table", "student_t_quantile", "comparison_grid"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` degrees of freedom (bisection on the CDF; 1e-10 accurate)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"need 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def paired_difference(trained: Sequence[float], base: Sequence[float], level: float = 0.95) -> dict:
    """Mean of trained - base over the items scored both ways, with its two-sided t confidence interval."""
    if len(trained) != len(base):
        raise ValueError(f"{len(trained)} trained scores for {len(base)} base scores")
    diffs = [t - b for t, b in zip(trained, base)]
    n = len(diffs)
    out = {"n": n, "base_mean": sum(base) / n if n else math.nan,
           "trained_mean": sum(trained) / n if n else math.nan, "diff_mean": sum(diffs) / n if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "level": level}
    if n >= 2:
        mean = out["diff_mean"]
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = student_t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
        out.update(ci_low=mean - half, ci_high=mean + half)
    return out


def score_table(records: Sequence[dict], group_field: str | None = None, column: str = "score") -> str:
    """A text table of score means: all items, then per value of `group_field` (e.g. task_type)."""
    groups: dict[str, list[float]] = {}
    for record in records:
        value = record.get(column)
        if value is None:
            continue
        groups.setdefault("all", []).append(value)
        if group_field and record.get(group_field) is not None:
            groups.setdefault(f"{group_field}={record[group_field]}", []).append(value)
    width = max([len(k) for k in groups] + [5])
    lines = [f"{'group':<{width}}  {'n':>5}  {'mean':>7}"]
    for name, values in groups.items():
        lines.append(f"{name:<{width}}  {len(values):>5}  {sum(values) / len(values):>7.4f}")
    return "\n".join(lines)


def comparison_grid(rows: Sequence[Sequence[Image.Image]], height: int = 256, gap: int = 4) -> Image.Image:
    """One row per item (e.g. source | base | trained), every image scaled to `height`, white gaps."""
    scaled = [[im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS)
               for im in row] for row in rows]
    columns = max(len(row) for row in scaled)
    widths = [max(row[c].width for row in scaled if c < len(row)) for c in range(columns)]
    grid = Image.new("RGB", (sum(widths) + gap * (columns + 1), len(scaled) * (height + gap) + gap), "white")
    for r, row in enumerate(scaled):
        x = gap
        for c, im in enumerate(row):
            grid.paste(im, (x, gap + r * (height + gap)))
            x += widths[c] + gap
    return grid
