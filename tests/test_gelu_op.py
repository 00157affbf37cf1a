"""`ops.gelu_tanh`: the native CPU kernel (csrc/gelu.cpp) against aten's GELU, outputs and gradients against fp64 by
the eager op's own error (2x plus a few ulps), fp32/bf16/fp16, odd and empty shapes, thread-count bit equality, the
disable and fp64 paths, and the custom op against its eager carrier.

`ops.gelu_tanh_` (in place, no grad): the same bits as `ops.gelu_tanh` on both backends, every dtype and odd, empty
and one-element shapes; dense permuted, gapped and overlapping layouts; the error under grad, the version counter,
the custom op (opcheck, torch.compile); and the MLP's no-grad peak memory."""

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


# ------------------------------------------------------------------------------------------- gelu_tanh_ (in place)

INPLACE_SHAPES = [(2, 37, 48), (1, 1, 7), (3, 5, 250), (40_000,), (1,), (), (0, 3)]
BACKENDS = [pytest.param(Backend.NATIVE, marks=needs_native, id="native"), pytest.param(Backend.REFERENCE,
                                                                                        id="reference")]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param is Backend.REFERENCE:
        monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    return request.param


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shape", INPLACE_SHAPES, ids=str)
def test_inplace_is_the_out_of_place_op_bit_for_bit(shape, dtype, backend):
    x, _ = _inputs(shape, dtype, seed=3)
    expected = ops.gelu_tanh(x)
    assert last_backend("gelu_tanh") is (backend if x.numel() and dtype != torch.float64 else Backend.REFERENCE)
    y = x.clone()
    ptr, version = y.data_ptr(), y._version
    assert ops.gelu_tanh_(y) is y
    assert last_backend("gelu_tanh_") is last_backend("gelu_tanh")
    assert y.data_ptr() == ptr and y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, expected)
    assert y._version > version or x.numel() == 0  # autograd sees the write (graphs that saved y notice)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_specials(backend):
    x = torch.tensor([-1e30, -100.0, -12.0, -0.0, 0.0, 12.0, 100.0, 1e30, float("inf"), float("-inf"), float("nan")])
    expected = ops.gelu_tanh(x)
    torch.testing.assert_close(ops.gelu_tanh_(x), expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(x[:8]), torch.signbit(expected[:8]))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_layouts(dtype, backend):
    """A dense permuted tensor is rewritten where it lies; a view with gaps changes its own elements only; a tensor
    with overlapping elements is refused (as by aten's in-place ops)."""
    base, _ = _inputs((4, 33, 70), dtype, seed=4)
    expected = ops.gelu_tanh(base)

    permuted = base.clone().permute(2, 0, 1)
    assert not permuted.is_contiguous()
    ptr = permuted.data_ptr()
    ops.gelu_tanh_(permuted)
    assert permuted.data_ptr() == ptr and permuted.stride() == (1, 33 * 70, 70)
    assert torch.equal(permuted, expected.permute(2, 0, 1))

    whole = base.clone()
    gapped = whole[1:, ::2, 3:61]
    # Against the out-of-place op on the same view: aten's GELU (the reference) rounds its vectorised body and its
    # scalar row tails differently, so its bits depend on the layout; the native op's do not.
    expected_gapped = ops.gelu_tanh(base[1:, ::2, 3:61])
    ops.gelu_tanh_(gapped)
    assert torch.equal(gapped, expected_gapped)
    if backend is Backend.NATIVE:
        assert torch.equal(gapped, expected[1:, ::2, 3:61])
    untouched = torch.ones_like(whole, dtype=torch.bool)
    untouched[1:, ::2, 3:61] = False
    assert torch.equal(whole[untouched], base[untouched])

    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        ops.gelu_tanh_(torch.randn(3, 1, dtype=dtype).expand(3, 4))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_refuses_grad_and_bumps_the_version(backend):
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="gelu_tanh_: `x` requires grad and grad mode is on"):
        ops.gelu_tanh_(x)
    with pytest.raises(RuntimeError, match="gelu_tanh_: `x` requires grad"):
        ops.gelu_tanh_(x * 2)  # a non-leaf too
    with torch.no_grad():  # allowed where no graph is recorded, like any in-place update of a parameter
        y = x.clone()
        ops.gelu_tanh_(y)
        assert torch.equal(y, ops.gelu_tanh(x))
    a = torch.randn(3, 4)  # grad mode on, nothing requires grad: no graph to break
    assert torch.equal(ops.gelu_tanh_(a.clone()), ops.gelu_tanh(a))
    saved = torch.randn(3, 4)
    out = x * saved  # mul saves `saved` for x's gradient
    with torch.no_grad():
        ops.gelu_tanh_(saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_under_inference_mode(backend):
    with torch.inference_mode():
        x = torch.randn(5, 9)
        expected = ops.gelu_tanh(x)
        assert torch.equal(ops.gelu_tanh_(x), expected)


def test_inplace_bad_input_is_named():
    with pytest.raises(ValueError, match="gelu_tanh_: `x` must be float"):
        ops.gelu_tanh_(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="gelu_tanh_: `x` must be a torch.Tensor"):
        ops.gelu_tanh_([1.0])


def test_inplace_custom_op_opcheck_and_compile():
    x, _ = _inputs((2, 7, 33), torch.float32, seed=5)
    torch.library.opcheck(gelu_module._gelu_inplace_op, (x.clone(),))
    y = x.clone()
    assert gelu_module._gelu_inplace_op(y) is None and torch.equal(y, ops.gelu_tanh(x))

    def f(a):  # an intermediate and a graph input, both overwritten
        b = a * 2.0
        ops.gelu_tanh_(b)
        ops.gelu_tanh_(a)
        return a + b

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a1, a2 = x.clone(), x.clone()
    with torch.no_grad():
        out_eager, out_compiled = f(a1), compiled(a2)
    assert torch.equal(out_eager, out_compiled) and torch.equal(a1, a2) and torch.equal(a2, ops.gelu_tanh(x))


@needs_native
def test_mlp_without_grad_holds_one_hidden_buffer():
    """The point of the in-place op: MLP's no-grad forward allocates fc1's [B, N, M] output and fc2's [B, N, C] result,
    no second [B, N, M] for the activation; with grad it matches the same forward bit for bit."""
    from nftcore.models.blocks import MLP
    from nftcore.testing.memory import peak_allocated_bytes

    torch.manual_seed(0)
    mlp = MLP(64, 256)
    x = torch.randn(2, 512, 64)
    hidden, out_bytes = 2 * 512 * 256 * 4, 2 * 512 * 64 * 4
    with torch.no_grad():
        mlp(x)  # warm-up (first-call allocations of the native module)
        result = {}
        peak = peak_allocated_bytes(lambda: result.setdefault("y", mlp(x)))
    assert peak <= hidden + out_bytes + (64 << 10), peak  # before gelu_tanh_: 2 x hidden + out
    assert torch.equal(result["y"], mlp(x).detach())
