"""The fused ops' eager carriers (nftcore/ops/eager.py) against their custom ops: the public functions, called
eagerly, run the op's body directly (no grad) or under a plain autograd.Function with the custom op's own setup and
backward (grad). Outputs and gradients must be the custom op's, bit for bit, on whichever backend dispatch picks."""

from __future__ import annotations

import importlib

import pytest
import torch

from nftcore import ops

adaln_module = importlib.import_module("nftcore.ops.adaln")
rms_norm_module = importlib.import_module("nftcore.ops.rms_norm")

EPS = 1e-6


def _inputs(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    return t


def _cases(dtype):
    t = _inputs(0, dtype)
    x, y, gate, scale, shift = t(2, 7, 24), t(2, 7, 24), t(2, 24), t(2, 24), t(2, 24)
    q, w = t(2, 5, 3, 8), t(8)
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    return {
        "adaln": (lambda: ops.adaln(x, scale, shift, EPS),
                  lambda: adaln_module._adaln_op(x, scale, shift, EPS)[0], (x, scale, shift)),
        "gated_residual": (lambda: ops.gated_residual(x, gate, y),
                           lambda: adaln_module._gated_residual_op(x, gate, y), (x, gate, y)),
        "gated_adaln": (lambda: torch.cat(ops.gated_adaln(x, gate, y, scale, shift, EPS)),
                        lambda: torch.cat(adaln_module._gated_adaln_op(x, gate, y, scale, shift, EPS)[:2]),
                        (x, gate, y, scale, shift)),
        "rms_norm_rope": (lambda: ops.rms_norm(q, w, EPS, rope=(cos, sin)),
                          lambda: rms_norm_module._rms_norm_op(q, w, cos, sin, EPS)[0], (q, w)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["adaln", "gated_residual", "gated_adaln", "rms_norm_rope"])
def test_eager_carrier_equals_the_custom_op(name, dtype):
    public, custom, inputs = _cases(dtype)[name]
    out = public()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    eager_grads = torch.autograd.grad(out, inputs, grad)
    ref = custom()
    assert torch.equal(out, ref)
    for a, b in zip(eager_grads, torch.autograd.grad(ref, inputs, grad)):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(public(), ref)
