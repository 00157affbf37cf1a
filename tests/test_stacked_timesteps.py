"""Stacked training timesteps (`nft.timestep_chunk`): one forward/backward over B × chunk rows gives the loss terms
and gradients of one pass per timestep, and the update's micro-batch loop reads nothing back from the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nftcore.config import load_config
from nftcore.trainer import Role, Trainer
from tests.helpers.trainer import tiny_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# T_train = int(5 · 0.99) = 4 timesteps; chunks of 3 leave a last pass of 1.
STEP_ARGS = {"nft.kl_weight": 1e-2, "sampling.num_steps": 5, "sampling.batch_size": 4, "optim.steps_per_epoch": 1}


def one_step(out, chunk: int, dtype: torch.dtype, checkpointing: bool = False, hook=None):
    """(the step's logged terms, the adapters' gradients) of epoch 0's update, every tensor in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        cfg = load_config(tiny_args(out, **{**STEP_ARGS, "nft.timestep_chunk": chunk,
                                            "model.gradient_checkpointing": checkpointing}))
        trainer = Trainer(cfg, echo=False)
        trainer.model.to(dtype)  # the LoRA adapters too (fp32 by default)
        with torch.no_grad():  # non-zero B, so that every adapter matrix has a gradient
            for p in trainer.params:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        rollouts = trainer.rollout(0)
        stats = trainer.advantages(0, rollouts)
        samples = torch.nonzero(stats.train).flatten().tolist()
        with hook() if hook else torch.enable_grad():
            terms = trainer.accumulate(0, rollouts, stats.r, samples)
        return terms, [p.grad.clone() for p in trainer.params]
    finally:
        torch.set_default_dtype(previous)


# fp64: only summation order differs, so agreement to ~1e3 ulps; fp32: the forward's own rounding, amplified by the
# x0-space weighting (the same bound the 1- vs 2-rank traces meet).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_stacked_timesteps_give_the_per_timestep_loss_and_gradients(tmp_path, dtype, chunk, checkpointing):
    loop_terms, loop_grads = one_step(tmp_path / "loop", 1, dtype, checkpointing)
    terms, grads = one_step(tmp_path / "stacked", chunk, dtype, checkpointing)
    tol = TOLERANCE[dtype]
    for name, want in dataclasses.asdict(loop_terms).items():  # the maxima too: each is one timestep's, per pass
        got = getattr(terms, name)
        assert abs(got - want) <= tol * abs(want), (name, got, want)
    for got, want in zip(grads, loop_grads):
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_the_update_reads_nothing_back_from_the_device_until_the_step_ends(tmp_path, monkeypatch):
    """Every way a tensor's value reaches Python (item, tolist, float/int/bool, cpu) is counted while one optimizer
    step's micro-batches run: only the step's summed terms come back, once (copied to the host, then read as
    numbers)."""
    import contextlib

    reads = []

    @contextlib.contextmanager
    def count_reads():
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                if self.numel() > 0 and not self.is_meta:
                    reads.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        try:
            yield
        finally:
            monkeypatch.undo()

    one_step(tmp_path, 0, torch.float32, hook=count_reads)
    assert reads == ["cpu", "tolist"], reads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_old_and_reference_in_one_pass_equal_two_passes(tmp_path, dtype):
    """θ_old on the first half of the rows, the adapters-off reference on the second, in one forward: exact in fp64,
    within the forward's own fp32 rounding (other GEMM shapes) otherwise."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        trainer = Trainer(load_config(tiny_args(tmp_path, **STEP_ARGS)), echo=False)
        trainer.model.to(dtype)
        weights, fam = trainer.weights, trainer.family
        with torch.no_grad():
            for p in [*weights.state(Role.OLD).values(), *weights.state(Role.THETA).values()]:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        samples = [fam.train_dataset[i] for i in range(3)]
        cond = fam.conditioning(samples)
        x = torch.randn(3, *fam.latent_shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0.3, 0.6, 0.9])
        with torch.no_grad():
            v_old, v_ref = weights.velocity(cond, Role.OLD)(x, t), weights.velocity(cond, Role.REF)(x, t)
            doubled = fam.index_conditioning(cond, torch.arange(3).repeat(2))
            both = weights.old_and_ref_velocity(doubled)(torch.cat([x, x]), torch.cat([t, t]))
    finally:
        torch.set_default_dtype(previous)
    assert (v_old - v_ref).abs().max() > 1e-3  # the adapter matters, so the test is not vacuous
    tol = TOLERANCE[dtype] * torch.cat([v_old, v_ref]).abs().max()
    assert (both - torch.cat([v_old, v_ref])).abs().max() <= tol


def test_running_out_of_memory_in_the_update_says_to_lower_the_chunk(tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cfg = load_config(tiny_args(tmp_path, **STEP_ARGS))
    with pytest.raises(RuntimeError, match=r"4 timestep\(s\) × 4 sample\(s\) = 16 rows.*lower --nft.timestep_chunk"):
        Trainer(cfg, loss_fn=out_of_memory, echo=False).train()
