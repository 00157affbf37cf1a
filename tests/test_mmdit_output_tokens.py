"""`num_output_tokens` (the edit target only): the last single block computes just those tokens (queries, MLP,
output projection), the other tokens only feed its keys and values. The result must be the full forward's first n
image tokens, and so must the gradients of every parameter and input, with and without grad, fp32 and bf16, on the
native and the reference backends."""

from __future__ import annotations

import pytest
import torch

from nftcore.ops.dispatch import Backend
from tests.helpers.native import needs_native
from tests.helpers.tiny_mmdit import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _tolerance(dtype: torch.dtype) -> dict:
    # Fewer rows in the same GEMMs and attention: the same per-row arithmetic, except where a BLAS kernel picks a
    # different blocking for another row count: a few ulp of the dtype at most.
    eps = torch.finfo(dtype).eps
    return dict(rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("backend", [pytest.param(Backend.NATIVE, marks=needs_native, id="native"),
                                     pytest.param(Backend.REFERENCE, id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_out", [1, 6, 15])
def test_output_tokens_are_the_full_forwards_first_tokens(n_out, dtype, backend, monkeypatch):
    if backend is Backend.REFERENCE:
        monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    else:
        monkeypatch.delenv("NFTCORE_DISABLE_NATIVE", raising=False)
    model, x = tiny("flux", dtype)
    with torch.no_grad():
        full = model(**x, return_dict=False)[0]
        part = model(**x, return_dict=False, num_output_tokens=n_out)[0]
    assert part.shape == (full.shape[0], n_out, full.shape[2])
    torch.testing.assert_close(part, full[:, :n_out], **_tolerance(dtype))

    seed = torch.Generator().manual_seed(1)
    grad_out = torch.randn(part.shape, generator=seed).to(dtype)
    results = []
    for kwargs in ({}, {"num_output_tokens": n_out}):
        model.zero_grad(set_to_none=True)
        hidden = x["hidden_states"].clone().requires_grad_(True)
        out = model(**(x | {"hidden_states": hidden}), return_dict=False, **kwargs)[0][:, :n_out]
        out.backward(grad_out)
        results.append([hidden.grad] + [p.grad for p in model.parameters()])
    for name, a, b in zip(["hidden_states"] + [n for n, _ in model.named_parameters()], *results):
        if a is None:
            assert b is None or not b.any(), name
            continue
        scale = a.abs().max().clamp_min(1)  # sums over rows: compare at the gradient's own magnitude
        torch.testing.assert_close(b / scale, a / scale, **_tolerance(dtype), msg=name)


@pytest.mark.parametrize("n_out", [0, -1, 16])
def test_output_tokens_out_of_range_are_refused(n_out):
    model, x = tiny("flux", torch.float32)  # 15 image tokens
    with pytest.raises(ValueError, match=r"num_output_tokens must be in \[1, 15\]"):
        model(**x, num_output_tokens=n_out)
