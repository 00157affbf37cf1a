"""The MMDiT reuses the RoPE tables of its previous call when the positions are the same (a sampler calls it many
times with one set of ids): reused only for equal id values, rebuilt for other ids even of the same shape and in the
same memory, and the output always equals a model without the cache."""

from __future__ import annotations

import pytest
import torch

from nftcore.models import mmdit as mmdit_module
from tests.helpers.tiny_mmdit import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_rope_tables_are_reused_only_for_the_same_positions(family, monkeypatch):
    model, x = tiny(family, torch.float32)
    builds = []
    build = mmdit_module.flux_rope if family == "flux" else mmdit_module.qwen_rope
    name = "flux_rope" if family == "flux" else "qwen_rope"
    monkeypatch.setattr(mmdit_module, name, lambda *a, **k: builds.append(1) or build(*a, **k))
    with torch.no_grad():
        first = model(**x, return_dict=False)[0]
        again = model(**x, return_dict=False)[0]
        assert len(builds) == 1 and torch.equal(first, again)
        if family == "flux":
            moved = x["img_ids"].clone()
            x["img_ids"].add_(1.0)  # new values in the same tensor: must not reuse
            shifted = model(**x, return_dict=False)[0]
            assert len(builds) == 2
            model.__dict__.pop("_rope_cache")
            assert torch.equal(shifted, model(**x, return_dict=False)[0])
            x["img_ids"] = moved
        else:
            x["img_shapes"] = [[(1, 5, 3)]] * 2  # the same token count on another grid
            shifted = model(**x, return_dict=False)[0]
            assert len(builds) == 2
        assert not torch.equal(shifted, first)
