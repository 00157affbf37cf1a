"""The native CPU kernels' tests (tests/test_native_ops.py, tests/test_block_ops_native.py): whether the build is
there, and their tolerance rule."""

from __future__ import annotations

import pytest
import torch

from nftcore import _native
from tests.helpers.tolerances import max_err

STATUS = _native.status()
needs_native = pytest.mark.skipif(not STATUS.loaded, reason=f"nftcore._C not available: {STATUS.reason}")


def check_rule(native, reference, truth, label, ulps=4):
    """max|native - truth| <= 2 x max|reference - truth| + `ulps` units of the native output's dtype at the truth's
    scale. Returns (native error, reference error) for the log."""
    err, ref_err = max_err(native, truth), max_err(reference, truth)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    floor = ulps * torch.finfo(native.dtype).eps * scale
    print(f"{label}: native {err:.3e}, reference {ref_err:.3e}, floor {floor:.1e}")
    assert native.dtype == reference.dtype and native.shape == reference.shape, label
    assert err <= 2 * ref_err + floor, f"{label}: {err:.3e} > 2 x {ref_err:.3e} + {floor:.1e}"
    return err, ref_err
