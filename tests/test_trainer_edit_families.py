"""The trainer on the real editing families: tiny random FLUX.1-Kontext and Qwen-Image-Edit(-2509) pipelines built
offline, a tiny Edit-R1 dataset folder, one epoch each, judged by a tiny random Qwen2.5-VL in process ('local') or
over HTTP on loopback ('server').

Every run: 32 px, K = 2, G = 2, 2 dpm2 steps, one optimizer step, one thread. The judge is random, so its scores mean
nothing; what is checked is that they are the judge's own (a fresh scoring of the same images gives the same
numbers, and they differ between edits), that the loss is finite and the LoRA moves, and that a dead judge drops
its group or stops the run with a clear message.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from nftcore.config import load_config
from nftcore.models import edit_velocity_fn
from nftcore.reward import MLLMReward
from nftcore.reward.server import RewardServer
from nftcore.testing.tiny_judge import random_image
from nftcore.testing.tiny_pipelines import build_qwen_edit_pipeline
from nftcore.trainer import Role, Trainer, build_family, read_metrics
from tests.helpers.edit_runs import PROMPTS, edit_args
from tests.helpers.judges import tiny_judge_folder, tiny_scorer

pytest.importorskip("diffusers")

DEAD_PROMPT = "turn the photo into a watercolor painting"  # the judge crashes on any batch holding it


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def qwen_plus_folder(tmp_path_factory):
    return build_qwen_edit_pipeline(tmp_path_factory.mktemp("qwen-edit-plus"), "QwenImageEditPlusPipeline")


class Recorder:
    """Passes every reward call through and keeps (edited, sources, prompts, metadata, result)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, edited, sources, prompts, metadata):
        result = self.inner(edited, sources, prompts, metadata)
        self.calls.append((edited, sources, list(prompts), list(metadata), result))
        return result


def train_one_epoch(args):
    """(trainer, metrics rows, the recorded reward calls, LoRA tensors before training)."""
    trainer = Trainer(load_config(args), echo=False)
    trainer.reward_fn = recorder = Recorder(trainer.reward_fn)
    before = {k: v.detach().clone() for k, v in trainer.weights.state(Role.THETA).items()}
    trainer.train()
    rows = read_metrics(trainer.cfg.run.metrics_path)
    return trainer, rows, recorder.calls, before


def check_trained(trainer, rows, before, *, samples):
    assert len(rows) == 1 and rows[0]["step"] == 1 and rows[0]["epoch"] == 0
    row = rows[0]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["trained_samples"] == samples
    after = trainer.weights.state(Role.THETA)
    assert all(torch.isfinite(v).all() for v in after.values())
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in moved), "no LoRA B matrix moved off its zero init"
    # only the adapters train: the base transformer, the VAE and the text encoders stay frozen
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    frozen = [m for m in vars(trainer.family.model).values()
              if isinstance(m, torch.nn.Module) and m is not trainer.model]
    assert len(frozen) >= 2 and not any(p.requires_grad for m in frozen for p in m.parameters())


def check_real_rewards(calls, rows, dataset, judge):
    """The scores are the judge's (`judge`, re-run on the very images, agrees) and they vary."""
    scores = torch.cat([result.scores for *_, result in calls])
    assert len(calls) == 2 and bool(torch.isfinite(scores).all()) and ((scores > 0) & (scores < 1)).all()
    assert scores.unique().numel() == scores.numel(), f"a constant-looking reward: {scores.tolist()}"
    assert rows[0]["reward_mean"] == pytest.approx(scores.double().mean().item(), abs=1e-6)
    for edited, sources, prompts, metadata, result in calls:
        assert edited.shape == sources.shape == (2, 3, 32, 32) and 0 <= edited.min() and edited.max() <= 1
        assert not torch.equal(edited[0], edited[1])  # a group's K edits come from different noise
        row = dataset.records[dataset.sample_ids.index(metadata[0]["sample_id"])]
        assert prompts == [row.prompt] * 2 and [m["requirement"] for m in metadata] == [row.requirement] * 2
        assert torch.allclose(judge(edited, sources, prompts, metadata).scores, result.scores, atol=1e-6)


def test_kontext_one_epoch_with_the_local_mllm_judge(tmp_path, kontext_folder):
    args = edit_args(tmp_path, kontext_folder, "flux",
                     **{"reward.backend": "local", "reward.model": tiny_judge_folder()})
    trainer, rows, calls, before = train_one_epoch(args)
    judge = trainer.reward_fn.inner  # the scorer build_reward loaded from reward.model
    assert isinstance(judge, MLLMReward)
    check_trained(trainer, rows, before, samples=4)
    check_real_rewards(calls, rows, trainer.family.train_dataset, judge)
    assert rows[0]["invalid_rewards"] == 0 and rows[0]["dropped_groups"] == 0
    assert (tmp_path / "out" / "checkpoints" / "epoch-000001" / "lora_ema" / "diffusers"
            / "pytorch_lora_weights.safetensors").is_file()


def test_qwen_edit_one_epoch_with_the_http_judge(tmp_path, qwen_folder):
    with RewardServer(tiny_scorer(), port=0, batch_wait_ms=0) as server:
        trainer, rows, calls, before = train_one_epoch(
            edit_args(tmp_path, qwen_folder, "qwen_image", **{"reward.backend": "server",
                                                              "reward.server_url": server.url}))
        assert server.worker.samples == 4
    assert trainer.family.model.variant == "edit"
    check_trained(trainer, rows, before, samples=4)
    check_real_rewards(calls, rows, trainer.family.train_dataset, MLLMReward(tiny_scorer()))  # the server's judge


class PartlyDeadScorer:
    """The tiny judge, except that it crashes on any batch holding DEAD_PROMPT (the server answers 500)."""

    def score(self, edited, sources, prompts, requirements):
        if DEAD_PROMPT in prompts:
            raise RuntimeError("the judge crashed")
        return tiny_scorer().score(edited, sources, prompts, requirements)


def test_qwen_plus_dead_judge_drops_its_group(tmp_path, qwen_plus_folder):
    # Two rows, G = 2: both are drawn; batch_size = K, so each group is one request and only DEAD_PROMPT's fails.
    with RewardServer(PartlyDeadScorer(), port=0, batch_wait_ms=0) as server:
        trainer, rows, calls, before = train_one_epoch(
            edit_args(tmp_path, qwen_plus_folder, "qwen_image", [PROMPTS[0], DEAD_PROMPT],
                      **{"reward.backend": "server", "reward.server_url": server.url}))
    assert trainer.family.model.variant == "plus"
    assert rows[0]["invalid_rewards"] == 2 and rows[0]["dropped_groups"] == 1
    check_trained(trainer, rows, before, samples=2)  # only the judged group trains
    dead = [result for _, _, prompts, _, result in calls if DEAD_PROMPT in prompts]
    assert len(dead) == 1 and not dead[0].valid.any() and "HTTP 500" in dead[0].errors[0]


def test_unreachable_judge_is_a_clear_error(tmp_path, kontext_folder):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = edit_args(tmp_path, kontext_folder, "flux",
                     **{"reward.backend": "server", "reward.server_url": f"127.0.0.1:{port}"})
    with pytest.raises(RuntimeError, match=r"every one of the 2 groups has an invalid reward.*\(server\) reachable"):
        Trainer(load_config(args), echo=False).train()


def test_qwen_conditioning_survives_cat_and_index(qwen_folder):
    """Rollout batches with different text lengths, concatenated (padded) and re-indexed (trimmed), give the
    velocities of the conditioning each sample was rolled out with."""
    from nftcore.family import cat_conditioning, index_conditioning
    from nftcore.models.families import QwenImageEditFamily

    family = QwenImageEditFamily.from_pretrained(qwen_folder, dtype=torch.float32, vae_area=32 * 32)
    rng = np.random.default_rng(1)
    images = [random_image(rng, 32, 32) for _ in range(4)]
    short = family.conditioning(images[:2], PROMPTS[:2], height=32, width=32)
    long = family.conditioning(images[2:], [PROMPTS[2], PROMPTS[2] + " and the lamp"], height=32, width=32)
    assert short.prompt_embeds.shape[1] < long.prompt_embeds.shape[1]
    both = cat_conditioning([short, long])
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    for rows, originals in (([0, 1], [(short, 0), (short, 1)]), ([1, 2], [(short, 1), (long, 0)]),
                            ([2, 3], [(long, 0), (long, 1)])):
        picked = index_conditioning(both, torch.tensor(rows))
        with torch.no_grad():
            got = edit_velocity_fn(family.transformer, picked)(x, 0.6)
            want = torch.cat([edit_velocity_fn(family.transformer, index_conditioning(c, torch.tensor([i])))(
                x[j:j + 1], 0.6) for j, (c, i) in enumerate(originals)])
        assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item(), rows  # batch-size rounding only
    assert index_conditioning(both, torch.tensor([0, 1])).prompt_embeds.shape[1] == short.prompt_embeds.shape[1]


def test_config_and_pipeline_must_agree(tmp_path, kontext_folder, qwen_folder):
    """Mismatches fail before any weight is loaded, naming the config key."""
    cases = [
        (dict(family="qwen_image", folder=kontext_folder), ValueError, "transformer is a 'flux' model"),
        (dict(family="flux", folder=kontext_folder, **{"sampling.guidance_scale": "none"}), ValueError,
         "set sampling.guidance_scale"),
        (dict(family="qwen_image", folder=tmp_path / "nowhere"), FileNotFoundError, "model.path="),
    ]
    for k, (case, error, message) in enumerate(cases):
        family, folder = case.pop("family"), case.pop("folder")
        cfg = load_config(edit_args(tmp_path / str(k), folder, family, **case))
        with pytest.raises(error, match=message):
            build_family(cfg, torch.device("cpu"))


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_sharded_encoders_and_judge_give_the_replicated_losses_on_two_ranks(tmp_path, family, kontext_folder,
                                                                           qwen_folder):
    """parallel.shard_text_encoder=true (FSDP2 over the frozen T5 + CLIP, or Qwen2.5-VL) and
    parallel.shard_reward_model=true (FSDP2 over the in-process judge, scoring in step) under torchrun: the same
    rewards and losses as whole copies on every rank, so sharding changes where the weights live, not the numbers."""
    from tests.helpers.jobs import TORCHRUN, run_job

    if not TORCHRUN.exists():
        pytest.skip("torchrun not in the venv")
    folder = kontext_folder if family == "flux" else qwen_folder
    out = {}
    for shard in (False, True):
        run = tmp_path / f"shard-{shard}"
        args = edit_args(run, folder, family, **{"parallel.shard_text_encoder": shard, "reward.backend": "local",
                                                 "parallel.shard_reward_model": shard,
                                                 "reward.model": tiny_judge_folder(), "reward.min_pixels": 56 * 56,
                                                 "reward.max_pixels": 112 * 112})
        result = run_job(args, nproc=2, timeout=300)
        assert ("text encoder(s)" in result.stdout and "FSDP2-sharded over 2 ranks" in result.stdout) == shard
        assert ("reward model: FSDP2-sharded over 2 ranks (3 layer groups)" in result.stdout) == shard
        out[shard] = read_metrics(run / "out" / "metrics.jsonl")
    print(family, out)
    assert len(out[True]) == len(out[False]) == 1
    (whole,), (sharded,) = out[False], out[True]
    assert 0 < whole["reward_std"] and whole["invalid_rewards"] == sharded["invalid_rewards"] == 0
    for key in ("reward_mean", "reward_std"):
        assert sharded[key] == pytest.approx(whole[key], abs=1e-5), key
    assert abs(sharded["loss"] - whole["loss"]) <= 1e-5 * max(1.0, abs(whole["loss"]))


@pytest.mark.parametrize("bad_lines", ["skip", "error"])
def test_an_image_that_fails_to_decode_when_drawn(tmp_path, kontext_folder, bad_lines):
    """The file exists (start-up validation passes) but is garbage. 'skip': the sample runs on a grey stand-in, its
    group is dropped and counted, the epoch trains on the other group; 'error': the run stops naming file:line."""
    from nftcore.data import ImageDecodeError

    args = edit_args(tmp_path, kontext_folder, "flux", **{"data.bad_lines": bad_lines})
    def brightness(edited, sources, prompts, metadata):  # any real function of the edit will do here
        from nftcore.reward.base import RewardResult

        return RewardResult.from_scores(torch.as_tensor(edited).float().mean(dim=(1, 2, 3)))

    trainer = Trainer(load_config(args), reward_fn=brightness, echo=False)
    (tmp_path / "data" / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    if bad_lines == "error":
        with pytest.raises(ImageDecodeError, match=r"train_metadata.jsonl:2: cannot read image"):
            trainer.train()
        return
    trainer.train()
    (row,) = read_metrics(trainer.cfg.run.metrics_path)
    assert row["unreadable_images"] == 2 and row["dropped_groups"] == 1 and row["trained_samples"] == 2
    assert math.isfinite(row["loss"])


def test_an_edit_r1_recipe_runs_unchanged_on_two_ranks_with_uneven_shares(tmp_path, kontext_folder):
    """`--config kontext_edit_r1` (sharded text encoders, as the recipe has it) with FSDP2 on the transformer and
    K·G = 3 samples: shares of 2 and 1 in rollout calls of one, so rank 1 pads a call (conditioning and transformer
    collectives included) and the update pads a micro-batch. Same rewards and loss as one process."""
    from tests.helpers.jobs import TORCHRUN, run_job

    if not TORCHRUN.exists():
        pytest.skip("torchrun not in the venv")
    rows = {}
    for nproc in (1, 2):
        run = tmp_path / f"ranks-{nproc}"
        args = ["--config", "kontext_edit_r1", *edit_args(run, kontext_folder, "flux", **{
            "sampling.group_size": 3, "sampling.groups_per_epoch": 1, "sampling.batch_size": 1,
            "parallel.shard_transformer": True, "reward.backend": "local", "reward.model": tiny_judge_folder(),
            "reward.min_pixels": 56 * 56, "reward.max_pixels": 112 * 112})]
        result = run_job(args, nproc=nproc, timeout=300)
        assert f"3 samples/epoch on {nproc} rank(s)" in result.stdout
        (rows[nproc],) = read_metrics(run / "out" / "metrics.jsonl")
    print(rows)
    assert rows[1]["trained_samples"] == rows[2]["trained_samples"] == 3
    for key in ("reward_mean", "reward_std"):
        assert rows[2][key] == pytest.approx(rows[1][key], abs=1e-5), key
    assert abs(rows[2]["loss"] - rows[1]["loss"]) <= 1e-5 * max(1.0, abs(rows[1]["loss"]))
