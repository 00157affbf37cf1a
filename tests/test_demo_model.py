"""nftcore.demo.model and nftcore.demo.pretrain: pixel-patch packing, the policy's conditioning / velocity / sampling
API, the one-file checkpoint, LoRA on the demo transformer, the shipped base checkpoint's partial skill, and a few
pretraining steps through the function API."""

from __future__ import annotations

import pytest
import torch

from nftcore.demo import DemoDataset, stack_images, tokenize_batch
from nftcore.demo.model import ASSET, DemoPolicy, pack_images, select_conditioning, unpack_images
from nftcore.demo.pretrain import PretrainConfig, eval_tasks, evaluate, flow_matching_loss, pretrain, underedited
from nftcore.models.lora import adapters_disabled, apply_lora, trainable_parameters, using_adapter

SIZE = DemoPolicy().demo.image_size  # 16 px: 4 × 4 tokens of 4 × 4 pixels


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def tasks():
    return list(DemoDataset(4, seed=5, size=SIZE).tasks)


def _randomised(seed: int = 0) -> DemoPolicy:
    """A fresh policy whose zero-initialised layers are filled in, so outputs depend on every weight."""
    policy = DemoPolicy.fresh(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy.eval()


def test_pack_unpack_round_trip():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = pack_images(images, 4)
    assert tokens.shape == (3, 64, 48)
    assert tokens.min() >= -1 and tokens.max() <= 1
    # token (row 1, col 2) holds the 4x4 patch at pixels [4:8, 8:12], channels (c, py, px)
    patch = images[0, :, 4:8, 8:12] * 2 - 1
    assert torch.allclose(tokens[0, 1 * 8 + 2], patch.reshape(-1))
    assert torch.allclose(unpack_images(tokens, 4, (8, 8)), images, atol=1e-6)
    with pytest.raises(ValueError):
        pack_images(images[:, :, :30], 4)


def test_conditioning_and_velocity_shapes(tasks):
    policy = _randomised()
    source, _ = stack_images(tasks)
    cond = policy.conditioning(source, [t.instruction for t in tasks])
    assert cond.prompt_embeds.shape == (4, 7, 64) and cond.pooled_prompt_embeds.shape == (4, 64)
    assert cond.source_latents.shape == (4, 16, 48)
    assert cond.img_ids.shape == (32, 3) and cond.txt_ids.shape == (7, 3) and cond.guidance is None
    assert cond.img_ids[16:, 0].eq(1).all() and cond.img_ids[:16, 0].eq(0).all()  # Kontext: source has index 1
    assert not cond.prompt_embeds.requires_grad  # frozen for RL: computed under no_grad
    x = policy.noise(4, torch.Generator().manual_seed(1))
    v = policy.velocity_fn(cond)(x, torch.tensor([0.9, 0.5, 0.3, 0.1]))
    assert v.shape == x.shape == (4, 16, 48)
    out = policy.sample(cond, x, num_steps=3, solver="euler")
    assert out.shape == x.shape
    images = policy.decode(out)
    assert images.shape == (4, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    sub = select_conditioning(cond, [2, 0])
    assert torch.allclose(policy.velocity_fn(sub)(x[[2, 0]], 0.4), policy.velocity_fn(cond)(x, 0.4)[[2, 0]], atol=1e-5)


def test_text_encoder_respects_padding():
    policy = _randomised()
    ids, mask = tokenize_batch(["remove the red circle", "make the blue square green"])
    embeds, pooled = policy.text_encoder(ids, mask)
    short_embeds, short_pooled = policy.text_encoder(ids[:, :6], mask[:, :6])  # one pad fewer
    assert torch.allclose(pooled, short_pooled, atol=1e-5)
    assert torch.allclose(embeds[:, :6], short_embeds, atol=1e-5)
    assert (embeds[~mask] == 0).all()
    changed = ids.clone()
    changed[~mask] = 5  # whatever sits under the mask changes nothing
    assert torch.allclose(policy.text_encoder(changed, mask)[1], pooled, atol=1e-6)


def test_save_load_round_trip(tmp_path, tasks):
    policy = _randomised(3)
    path = policy.save(tmp_path / "p.safetensors")
    loaded = DemoPolicy.load(path)
    assert loaded.config_dict() == policy.config_dict()
    source, _ = stack_images(tasks)
    prompts = [t.instruction for t in tasks]
    a = policy.edit(source, prompts, generator=torch.Generator().manual_seed(0), num_steps=2)
    b = loaded.edit(source, prompts, generator=torch.Generator().manual_seed(0), num_steps=2)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        DemoPolicy.from_pretrained(tmp_path / "missing.safetensors")


def test_shipped_base_checkpoint_has_partial_skill():
    assert ASSET.is_file(), "run `python -m nftcore.demo.pretrain` to make the shipped base checkpoint"
    policy = DemoPolicy.from_pretrained()
    held_out = eval_tasks(16, size=policy.demo.image_size)
    rewards = evaluate(policy, held_out, num_steps=6, solver="dpm2", seed=0)
    again = evaluate(policy, held_out, num_steps=6, solver="dpm2", seed=0)
    assert torch.equal(rewards, again)
    assert 0.15 < rewards.mean().item() < 0.85, rewards
    assert rewards.std() > 0.02  # a spread for group-relative advantages to rank


def test_lora_starts_as_identity_and_trains_only_adapters(tasks):
    policy = _randomised(4)
    source, _ = stack_images(tasks)
    cond = policy.conditioning(source, [t.instruction for t in tasks])
    x = policy.noise(4, torch.Generator().manual_seed(2))
    before = policy.velocity_fn(cond)(x, 0.7).detach()
    layers = apply_lora(policy.transformer, rank=4, alpha=8.0)
    assert layers
    velocity = policy.velocity_fn(cond)
    assert torch.equal(velocity(x, 0.7), before)  # B = 0 at init
    with adapters_disabled(policy.transformer), torch.no_grad():
        assert torch.equal(velocity(x, 0.7), before)
    with using_adapter(policy.transformer, "old"), torch.no_grad():
        assert torch.equal(velocity(x, 0.7), before)
    adapters = {id(p) for p in trainable_parameters(policy.transformer, "default")}
    velocity(x, 0.7).square().mean().backward()
    trained = [n for n, p in policy.named_parameters() if p.grad is not None]
    assert trained and all(id(dict(policy.named_parameters())[n]) in adapters for n in trained)
    assert cond.prompt_embeds.grad_fn is None  # the text encoder is frozen by construction in RL
    # the file holds base weights only, so saving with adapters attached still loads into a plain policy
    assert not any(".lora_" in k for k in policy.base_state_dict())


def test_pretrain_runs_a_few_steps():
    cfg = PretrainConfig(steps=3, batch_size=4, warmup=1, underedit_steps=2, eval_every=0, seed=1)
    policy = DemoPolicy.fresh(cfg.seed)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    trained = pretrain(cfg, policy=policy, log=None)
    assert trained is policy and not policy.training
    moved = [k for k, v in policy.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("transformer.") for k in moved) and any(k.startswith("text_encoder.") for k in moved)
    loss = flow_matching_loss(policy, list(DemoDataset(2, seed=0, size=SIZE).tasks), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    # deterministic from the seed
    again = pretrain(cfg, log=None)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in policy.state_dict().items())


def test_pretrain_settings_out_of_range_are_named(capsys):
    with pytest.raises(ValueError, match="underedit_strength = 1.5"):
        PretrainConfig(underedit_strength=1.5)
    from nftcore.demo.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--underedit-lr", "0", "--out", "unused.safetensors"])
    assert exit_info.value.code == 2 and "underedit_lr = 0.0" in capsys.readouterr().err


def test_underedited_targets_are_blends_the_verifier_scores_linearly():
    from nftcore.demo.verifier import SOURCE_CREDIT, verify

    tasks = list(DemoDataset(6, seed=3, size=SIZE).tasks)
    assert all(torch.equal(underedited(t, 0.0).target_image, t.source_image) for t in tasks)
    assert all(torch.equal(underedited(t, 1.0).target_image, t.target_image) for t in tasks)
    faint = [underedited(t, 0.3) for t in tasks]
    assert [f.instruction for f in faint] == [t.instruction for t in tasks]  # the pair keeps the true instruction
    scores = verify(torch.stack([f.target_image for f in faint]), tasks)  # judged against the true target
    torch.testing.assert_close(scores, torch.full_like(scores, SOURCE_CREDIT + (1 - SOURCE_CREDIT) * 0.3))


def test_before_after_summary_pairs_tasks_and_splits_by_type():
    """The end-of-run table: means with standard errors, the per-task paired difference, one row per task type;
    tasks only one side scored are left out of every row."""
    from types import SimpleNamespace

    from nftcore.demo.showcase import mean_and_error, summary_lines

    base = SimpleNamespace(scores=torch.tensor([0.4, 0.5, 0.6, 0.3]), indices=torch.tensor([0, 1, 2, 3]))
    final = SimpleNamespace(scores=torch.tensor([0.6, 0.9, 0.7]), indices=torch.tensor([0, 1, 2]))
    lines = summary_lines(base, final, lambda i: "move" if i == 1 else "recolor")
    assert lines[0].startswith("# eval on 3 held-out tasks")
    assert "+0.233" in lines[2]  # all: mean of (0.2, 0.4, 0.1)
    assert [line.split()[1] for line in lines[3:]] == ["move", "recolor"]
    assert "+0.400" in lines[3] and "nan" in lines[3]  # one task: no standard error
    mean, error = mean_and_error(torch.tensor([1.0, 2.0, 3.0]))
    assert mean == 2.0 and abs(error - 1 / 3 ** 0.5) < 1e-12
