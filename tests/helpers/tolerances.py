"""Error measures the tests share: the max error of an op against its oracle, the relative gap of two loss traces."""

from __future__ import annotations


def max_err(a, b) -> float:
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def relative_gap(a: list[float], b: list[float]) -> float:
    """max |a_i - b_i| / |a_i| over two traces of the same length."""
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))
