"""Config keys the trainer honours or refuses by name, never ignores: model.dtype, data.num_workers, and the
settings the demo family or the trainer cannot honour yet (the metrics keys are in test_trainer_metrics.py, the
replicated `parallel.shard_transformer = false` in test_trainer_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nftcore.config import ConfigError, load_config
from nftcore.trainer import DistEnv, Trainer, read_metrics
from tests.helpers.trainer import run_tiny, tiny_args


def test_model_dtype_stores_the_demo_base_in_bf16_with_fp32_adapters(tmp_path):
    trainer, _ = run_tiny(tmp_path, **{"run.epochs": 1, "model.dtype": "bf16"})
    base = {p.dtype for name, p in trainer.model.named_parameters() if ".lora_" not in name}
    assert base == {torch.bfloat16} and {p.dtype for p in trainer.params} == {torch.float32}
    assert all(math.isfinite(row["loss"]) for row in read_metrics(tmp_path / "metrics.jsonl"))


def test_data_workers_read_rows_in_threads_with_the_same_result(tmp_path):
    run_tiny(tmp_path / "inline", **{"run.epochs": 1})
    run_tiny(tmp_path / "threads", **{"run.epochs": 1, "data.num_workers": 2})
    inline, threads = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("inline", "threads"))
    assert [r["loss"] for r in inline] == [r["loss"] for r in threads]


@pytest.mark.parametrize("key, value", [("sampling.guidance_scale", "2.5"), ("data.path", "data/edit-r1-dataset")])
def test_demo_family_refuses_what_it_cannot_honour(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"model.family='demo' cannot honour {key}="):
        load_config(tiny_args(tmp_path, **{key: value}))


def test_demo_text_encoder_sharding_is_refused_on_several_ranks(tmp_path):
    cfg = load_config(tiny_args(tmp_path, **{"parallel.shard_text_encoder": True}))
    with pytest.raises(ConfigError, match="parallel.shard_text_encoder=true: the demo's text encoder"):
        Trainer(cfg, env=DistEnv(rank=0, world_size=2), echo=False)


@pytest.mark.parametrize("argv, needle", [
    (["--parallel.shard_transformer=false", "--parallel.cpu_offload=true"],
     "parallel.cpu_offload needs parallel.shard_transformer"),
])
def test_config_refuses_unimplemented_combinations(argv, needle):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert needle in str(info.value)


@pytest.mark.parametrize("argv, want", [
    ([], dict(dtype=torch.float32, min_pixels=None, max_pixels=None)),  # 'auto' on a CPU rank; the processor's bounds
    (["--reward.dtype=bf16", "--reward.min_pixels=3136", "--reward.max_pixels=50176"],
     dict(dtype=torch.bfloat16, min_pixels=3136, max_pixels=50176)),
])
def test_local_judge_loads_on_the_policy_device(monkeypatch, argv, want):
    """reward.backend=local puts the judge where this rank's policy is (cuda:LOCAL_RANK under torchrun), not on the
    default device, where every rank's copy would land on one GPU; reward.dtype and the pixel bounds reach it."""
    from types import SimpleNamespace

    from nftcore.reward import MLLMScorer
    from nftcore.trainer.rewards import build_reward

    seen = {}
    monkeypatch.setattr(MLLMScorer, "from_pretrained", classmethod(
        lambda cls, folder, device=None, **kw: seen.update(device=device, folder=folder, **kw)))
    monkeypatch.setattr("nftcore.reward.MLLMReward", lambda scorer: scorer)
    family = SimpleNamespace(transformer=SimpleNamespace(device=torch.device("cpu", 3)))
    cfg = load_config(["--reward.backend", "local", "--reward.model", "JUDGE-DIR", *argv])
    build_reward(cfg, family)
    assert seen == dict(device=torch.device("cpu", 3), folder="JUDGE-DIR", **want)
