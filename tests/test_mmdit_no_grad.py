"""The MMDiT's no-grad forward (rollouts), which overwrites buffers in place to lower its peak (`ops.gelu_tanh_` in the
MLPs, the single block's normalised q/k written back into its QKV buffer), gives the very bits of the grad-mode
forward (out-of-place ops throughout): FLUX (double + single blocks) and Qwen-Image (padded text), fp32 and bf16,
native and reference backends, under no_grad and inference_mode."""

from __future__ import annotations

import pytest
import torch

from nftcore import ops
from nftcore.ops.dispatch import Backend
from tests.helpers.native import needs_native
from tests.helpers.tiny_mmdit import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py

@pytest.mark.parametrize("backend", [pytest.param(Backend.NATIVE, marks=needs_native, id="native"),
                                     pytest.param(Backend.REFERENCE, id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_no_grad_forward_is_the_grad_forward_bit_for_bit(family, dtype, backend, monkeypatch):
    if backend is Backend.REFERENCE:
        monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    else:
        monkeypatch.delenv("NFTCORE_DISABLE_NATIVE", raising=False)
    model, x = tiny(family, dtype)
    calls = []
    inplace = ops.gelu_tanh_
    monkeypatch.setattr(ops, "gelu_tanh_", lambda t: calls.append(t.shape) or inplace(t))

    out = model(**x).sample  # grad mode, every parameter trainable: out-of-place ops only
    assert out.requires_grad and calls == []
    with torch.no_grad():
        no_grad = model(**x).sample
    mlps = 2 * model.config.num_layers + model.config.num_single_layers
    assert len(calls) == mlps
    assert ops.last_backend("gelu_tanh_") is backend
    with torch.inference_mode():
        inference = model(**x).sample
    assert len(calls) == 2 * mlps
    assert no_grad.dtype == dtype
    assert torch.equal(no_grad, out.detach()) and torch.equal(inference, out.detach())
