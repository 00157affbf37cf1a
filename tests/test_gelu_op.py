"""`ops.gelu_tanh`: the native CPU kernel (csrc/gelu.cpp) against aten's GELU, outputs and gradients against fp64 by
the eager op's own error (2x plus a few ulps), fp32/bf16/fp16, odd and empty shapes, thread-count bit equality, the
disable and fp64 paths, and the custom op against its eager carrier."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from nftcore import ops
from nftcore.ops import last_backend
from nftcore.ops.dispatch import Backend
from tests.helpers.native import check_rule, needs_native

gelu_module = importlib.import_module("nftcore.ops.gelu")
SHAPES = [(2, 37, 48), (1, 1, 7), (3, 5, 250), (40_000,), (2, 9, 1000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _native_allowed(monkeypatch):
    monkeypatch.delenv("NFTCORE_DISABLE_NATIVE", raising=False)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)  # tails reach |x| ~ 12: both saturated ends
    return x, torch.randn(shape, generator=g).to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_fp64_as_well_as_aten(shape, dtype):
    x, grad = _inputs(shape, dtype)
    xr = x.clone().requires_grad_()
    out = ops.gelu_tanh(xr)
    assert last_backend("gelu_tanh") is Backend.NATIVE
    (dx,) = torch.autograd.grad(out, xr, grad)
    assert last_backend("gelu_tanh_backward") is Backend.NATIVE
    x64 = x.double().requires_grad_()
    truth = F.gelu(x64, approximate="tanh")
    (dx_truth,) = torch.autograd.grad(truth, x64, grad.double())
    xe = x.clone().requires_grad_()
    eager = F.gelu(xe, approximate="tanh")
    (dx_eager,) = torch.autograd.grad(eager, xe, grad)
    check_rule(out.detach(), eager.detach(), truth.detach(), f"gelu {shape} {dtype}")
    check_rule(dx, dx_eager, dx_truth, f"gelu backward {shape} {dtype}")


@needs_native
def test_saturated_ends_and_specials():
    x = torch.tensor([-1e30, -100.0, -12.0, -0.0, 0.0, 12.0, 100.0, 1e30, float("inf"), float("-inf")])
    out = ops.gelu_tanh(x)
    torch.testing.assert_close(out, F.gelu(x, approximate="tanh"), rtol=0, atol=0, equal_nan=True)  # -inf: nan
    assert torch.equal(torch.signbit(out[:8]), torch.signbit(F.gelu(x[:8], approximate="tanh")))
    assert torch.isnan(ops.gelu_tanh(torch.tensor([float("nan")]))).all()


@needs_native
def test_thread_count_does_not_change_bits():
    x, grad = _inputs((3, 101, 700), torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            out = ops.gelu_tanh(xr)
            results.append((out.detach(), torch.autograd.grad(out, xr, grad)[0]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_disable_fp64_and_empty_take_the_reference(monkeypatch):
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(ops.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert last_backend("gelu_tanh") is Backend.REFERENCE
    assert ops.gelu_tanh(torch.empty(0, 3)).shape == (0, 3)
    monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    y = torch.randn(4, 5)
    assert torch.equal(ops.gelu_tanh(y), F.gelu(y, approximate="tanh"))
    assert last_backend("gelu_tanh") is Backend.REFERENCE


def test_eager_carrier_equals_the_custom_op_and_opcheck():
    x, grad = _inputs((2, 7, 33), torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ops.gelu_tanh(xa), gelu_module._gelu_op(xb)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, xa, grad)[0], torch.autograd.grad(b, xb, grad)[0])
    torch.library.opcheck(gelu_module._gelu_op, (x.clone().requires_grad_(),))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="gelu_tanh: `x` must be float"):
        ops.gelu_tanh(torch.ones(3, dtype=torch.int64))


def test_double_backward_through_the_op():
    """A backward that records its own graph (create_graph) runs aten's differentiable gelu_backward."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(ops.gelu_tanh, (x,))
