"""`num_output_tokens` (the edit target only): the last single block computes just those tokens (queries, MLP,
output projection), the other tokens only feed its keys and values. The result must be the full forward's first n
image tokens, and so must the gradients of every parameter and of the input, with and without grad, fp32 and bf16,
on the native and the reference backends: as close to an fp64 run as the full forward is (flash-attention's rule;
fewer rows in the same GEMMs may round differently where a BLAS picks another blocking)."""

from __future__ import annotations

import copy

import pytest
import torch

from nftcore.ops.dispatch import Backend
from tests.helpers.native import needs_native
from tests.helpers.tiny_mmdit import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _run(model, x, n_out, grad_out, **kwargs):
    """Output [:, :n_out] and the gradients (input first, then every parameter) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    hidden = x["hidden_states"].clone().requires_grad_(True)
    out = model(**(x | {"hidden_states": hidden}), return_dict=False, **kwargs)[0][:, :n_out]
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [hidden.grad] + [p.grad for p in model.parameters()]


def _err(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if ref is None:
        return 0.0 if a is None else a.abs().max().item()
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


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
    exact = copy.deepcopy(model).double()
    x64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    grad_out = torch.randn(x["hidden_states"].shape[0], n_out, 8, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    ref, ref_grads = _run(exact, x64, n_out, grad_out)
    full, full_grads = _run(model, x, n_out, grad_out)
    part, part_grads = _run(model, x, n_out, grad_out, num_output_tokens=n_out)
    with torch.no_grad():
        no_grad = model(**x, return_dict=False, num_output_tokens=n_out)[0]
    assert part.shape == (x["hidden_states"].shape[0], n_out, 8)
    eps = torch.finfo(dtype).eps
    assert torch.equal(no_grad, part)  # the no-grad forward's in-place buffers round exactly like grad mode
    assert _err(part, ref) <= 2 * _err(full, ref) + 4 * eps
    names = ["hidden_states"] + [name for name, _ in model.named_parameters()]
    for name, p, f, r in zip(names, part_grads, full_grads, ref_grads):
        assert _err(p, r) <= 2 * _err(f, r) + 4 * eps, name


@pytest.mark.parametrize("n_out", [0, -1, 16])
def test_output_tokens_out_of_range_are_refused(n_out):
    model, x = tiny("flux", torch.float32)  # 15 image tokens
    with pytest.raises(ValueError, match=r"num_output_tokens must be in \[1, 15\]"):
        model(**x, num_output_tokens=n_out)
