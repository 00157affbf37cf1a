"""The op machinery: which backend runs, and that the environment overrides force and disable each one."""

import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from nftcore import ops
from nftcore.ops import dispatch as dispatch_module
from nftcore.ops.dispatch import Backend, dispatch, env_flag, last_backend, select_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ALL = {Backend.REFERENCE: None, Backend.TRITON: None, Backend.NATIVE: None}


@pytest.fixture
def env(env):
    """tests/conftest.py's `env` (backend flags cleared), with the Triton interpreter on."""
    env.setenv("TRITON_INTERPRET", "1")
    return env


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_env_flag_values(env, value, expected):
    env.setenv("NFTCORE_FORCE_TRITON", value)
    assert env_flag("NFTCORE_FORCE_TRITON") is expected


def test_defaults_cuda_gets_triton_cpu_gets_native_or_reference(env):
    assert select_backend("op", CUDA, ALL) is Backend.TRITON
    cpu_default = Backend.NATIVE if dispatch_module.native_available() else Backend.REFERENCE
    assert select_backend("op", CPU, ALL) is cpu_default
    assert select_backend("op", CUDA, {Backend.REFERENCE: None}) is Backend.REFERENCE
    env.setattr(dispatch_module, "native_available", lambda: False)  # a machine without the native build
    assert select_backend("op", CPU, ALL) is Backend.REFERENCE


def test_disable_triton(env):
    env.setenv("NFTCORE_DISABLE_TRITON", "1")
    assert select_backend("op", CUDA, ALL) is Backend.REFERENCE


def test_force_triton_on_cpu_needs_the_interpreter(env):
    env.setenv("NFTCORE_FORCE_TRITON", "1")
    assert select_backend("op", CPU, ALL) is Backend.TRITON
    # An op without a Triton kernel keeps running on its other backends.
    assert select_backend("op", CPU, {Backend.REFERENCE: None}) is Backend.REFERENCE
    env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend("op", CPU, ALL)


def test_force_and_disable_together_is_an_error(env):
    env.setenv("NFTCORE_FORCE_TRITON", "1")
    env.setenv("NFTCORE_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="both"):
        select_backend("op", CPU, ALL)


def test_native_backend_on_cpu_when_loaded(env):
    env.setattr(dispatch_module, "native_available", lambda: True)
    assert select_backend("op", CPU, ALL) is Backend.NATIVE
    assert select_backend("op", CUDA, ALL) is Backend.TRITON  # native is a CPU library
    env.setenv("NFTCORE_FORCE_TRITON", "1")
    assert select_backend("op", CPU, ALL) is Backend.TRITON
    env.delenv("NFTCORE_FORCE_TRITON")
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    assert select_backend("op", CPU, ALL) is Backend.REFERENCE


def test_native_available_is_the_loaders_verdict():
    from nftcore import _native

    assert dispatch_module.native_available() is _native.status().loaded


def test_disable_native_is_read_per_call_before_loading(env):
    """NFTCORE_DISABLE_NATIVE=1 wins without even asking whether the library loads (so no load, no warning)."""

    def must_not_be_called():
        raise AssertionError("native_available() called although NFTCORE_DISABLE_NATIVE=1")

    env.setattr(dispatch_module, "native_available", must_not_be_called)
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    assert select_backend("op", CPU, ALL) is Backend.REFERENCE
    env.setenv("NFTCORE_DISABLE_NATIVE", "0")
    env.setattr(dispatch_module, "native_available", lambda: True)
    assert select_backend("op", CPU, ALL) is Backend.NATIVE


def test_every_op_needs_a_reference(env):
    with pytest.raises(RuntimeError, match="reference"):
        select_backend("op", CPU, {Backend.TRITON: None})


@triton.jit
def _double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offsets < n
    tl.store(out_ptr + offsets, 2.0 * tl.load(x_ptr + offsets, mask=keep), mask=keep)


def _double_triton(x):
    out = torch.empty_like(x)
    _double_kernel[(triton.cdiv(x.numel(), 64),)](x, out, x.numel(), BLOCK=64)
    return out


def _double(x):
    """A toy op wired exactly like the real ones: loaders per backend, decision per call."""
    impls = {Backend.REFERENCE: lambda: (lambda y: y * 2), Backend.TRITON: lambda: _double_triton}
    return dispatch("toy_double", x.device, impls)(x)


def test_forced_triton_kernel_runs_under_the_interpreter(env):
    x = torch.randn(100)
    torch.testing.assert_close(_double(x), 2 * x)
    assert last_backend("toy_double") is Backend.REFERENCE
    env.setenv("NFTCORE_FORCE_TRITON", "1")
    torch.testing.assert_close(_double(x), 2 * x)
    assert last_backend("toy_double") is Backend.TRITON


def test_importing_ops_stays_light():
    code = (
        "import sys, nftcore.ops\n"
        "heavy = [m for m in ('transformers', 'diffusers', 'safetensors', 'PIL', 'nftcore.kernels', 'nftcore._C')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_no_grad_calls_skip_the_custom_op_only_for_plain_eager_tensors():
    """Without grad an op runs its backend directly (same kernel, same result as through the custom op); with grad,
    or with a FakeTensor (shape inference, tracing), it goes through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nftcore.ops.eager import call_directly

    q, k, v = (torch.randn(2, 7, 2, 8) for _ in range(3))
    with torch.no_grad():
        assert call_directly(q, None, torch.nn.Parameter(k))
        direct = ops.attention(q, k, v)
    assert not call_directly(q)
    through_op = ops.attention(q.requires_grad_(), k, v)
    assert torch.equal(direct, through_op.detach())
    with FakeTensorMode() as mode, torch.no_grad():
        assert not call_directly(mode.from_tensor(q))
