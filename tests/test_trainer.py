"""The trainer in one process: smoke run, golden loss trace, bad config, dead rewards, NaN losses.

All runs use the tiny random demo policy (`--model.path tiny`: 1 double + 1 single block) on the demo's 16 px
tasks with K = 2, so each takes a few seconds on two cores.

The golden trace (tests/assets/golden_demo_loss.json) is regenerated with

    .venv/bin/python tests/test_trainer.py --write-golden

after a deliberate change of the loss, the sampler, the seeding or the demo model; commit it with that change.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nftcore.config import ConfigError, load_config
from nftcore.demo.family import DemoReward
from nftcore.models.lora import lora_layers
from nftcore.reward.base import RewardResult
from nftcore.trainer import REQUIRED_KEYS, NonFiniteLossError, Role, Trainer, read_metrics
from tests.helpers.trainer import loss_trace, run_tiny, tiny_args

GOLDEN = Path(__file__).parent / "assets" / "golden_demo_loss.json"
GOLDEN_RTOL = 2e-3  # thread count and BLAS change the last bits, amplified ~100× by the ODE and the x0 weighting


def test_smoke_run_writes_metrics_checkpoints_and_lora(tmp_path):
    trainer, result = run_tiny(tmp_path, **{"checkpoint.keep_latest": 1})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch"] for r in rows] == [0, 0, 1, 1]
    for row in rows:
        assert set(REQUIRED_KEYS) <= row.keys()
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
        assert {"policy_loss", "kl_loss", "x0_pred_norm", "x0_norm", "x0_norm_max", "old_deviate", "old_deviate_max",
                "old_kl_div", "zero_std_ratio", "mean_reward_10", "invalid_rewards", "samples_per_s", "time_rollout",
                "time_reward_wait", "time_train"} <= row.keys()
        assert row["samples_per_s_per_rank"] == row["samples_per_s"] and row["rollout_samples_per_s_per_rank"] > 0
    assert result["step"] == 4 and result["epoch"] == 2
    # one process, a small model: the no-grad forwards keep their merged LoRA weights between calls
    assert all(layer.cache_merged for layer in lora_layers(trainer.weights.model).values())
    last = tmp_path / "checkpoints" / "epoch-000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-000002"]  # keep_latest = 1
    assert (last / "COMPLETE").is_file() and (last / "config.toml").is_file()
    assert (last / "lora_ema" / "peft" / "adapter_model.safetensors").is_file()
    assert (last / "lora_ema" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    state = json.loads((last / "trainer.json").read_text())
    assert state["step"] == 4 and state["epoch"] == 2
    epochs = read_metrics(tmp_path / "epochs.jsonl")  # one summary per epoch, with the epoch's throughput
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 2), (1, 4)]
    for row in epochs:
        assert row["samples_per_s_per_rank"] > 0 and row["valid_samples"] == 4
        assert row["time_epoch"] >= row["time_rollout"] + row["time_update"] > 0


def test_full_finetuning_trains_every_weight_and_resumes(tmp_path):
    trainer, _ = run_tiny(tmp_path, finetune="full", **{"nft.kl_weight": 1e-2})
    assert len(trainer.params) == len(list(trainer.model.parameters()))
    before = {k: v.clone() for k, v in trainer.weights.state(Role.THETA).items()}
    old, ref = trainer.weights.state(Role.OLD), dict(trainer.weights.ref.named_parameters())
    assert all(torch.equal(v, old[k]) for k, v in before.items())  # decay_type 0: θ_old is θ after each epoch
    assert not all(torch.equal(v, ref[k]) for k, v in before.items())  # θ moved away from the frozen base
    resumed, _ = run_tiny(tmp_path, finetune="full", **{"nft.kl_weight": 1e-2, "checkpoint.resume": "latest"})
    assert resumed.step == 4 and all(torch.equal(v, resumed.weights.state(Role.THETA)[k]) for k, v in before.items())
    assert all(math.isfinite(x) for x in loss_trace(tmp_path))


def test_golden_loss_trace(tmp_path):
    run_tiny(tmp_path)
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == tiny_args("OUT"), "the golden run's settings changed: regenerate (see module docstring)"
    got = loss_trace(tmp_path)
    print("golden", golden["loss"], "\ngot   ", got)
    assert got == pytest.approx(golden["loss"], rel=GOLDEN_RTOL)


def test_bad_config_key_is_a_clear_error(capsys):
    with pytest.raises(ConfigError, match="unknown key .learning_rate. in section"):
        load_config(["--optim.learning_rate=1e-3"])
    from nftcore.train import main

    assert main(["--nft.bta=2"]) == 2
    assert "nft.bta" in capsys.readouterr().err


class FlakyReward:
    """The demo judge, but every sample of the groups whose rollouts land in `dead` calls is invalid."""

    def __init__(self, dead_calls=(0,)):
        self.calls, self.dead, self.inner = 0, set(dead_calls), DemoReward()

    def __call__(self, edited, sources, prompts, metadata):
        result = self.inner(edited, sources, prompts, metadata)
        dead = self.calls in self.dead
        self.calls += 1
        if dead:
            return RewardResult.invalid(len(prompts), "judge timed out")
        return result


def test_invalid_reward_drops_and_counts_its_group(tmp_path):
    # batch_size 2 = one group per rollout call: the first call of every epoch fails, so one group of two is dropped.
    _, result = run_tiny(tmp_path, reward_fn=FlakyReward(dead_calls=(0, 2)), **{"sampling.batch_size": 2})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["invalid_rewards"] == 2 and r["dropped_groups"] == 1 for r in rows)
    assert all(r["trained_samples"] == 1 for r in rows)  # the surviving group's 2 samples over 2 optimizer steps
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_invalid_reward_reasons_are_logged_once_per_epoch_with_counts(tmp_path, capsys):
    cfg = load_config(tiny_args(tmp_path, **{"sampling.batch_size": 2}))
    Trainer(cfg, reward_fn=FlakyReward(dead_calls=(0, 2)), echo=True).train()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "invalid reward" in line]
    assert len(warnings) == 2 and all("2 x judge timed out" in line for line in warnings), warnings


def test_all_rewards_invalid_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="every one of the 2 groups has an invalid reward"):
        run_tiny(tmp_path, reward_fn=FlakyReward(dead_calls=range(100)))


def saturated_reward(edited, sources, prompts, metadata):
    """Every edit scores 0.95 ± 0.001: saturated groups, which the paper's rule filters and the ban removes."""
    return RewardResult.from_scores([0.95 + 0.001 * (i % 2) for i in range(len(prompts))])


def test_saturated_groups_are_filtered_and_banned(tmp_path):
    trainer, result = run_tiny(tmp_path, reward_fn=saturated_reward,
                               **{"filter.rule": "paper", "filter.ban_prompts": True})
    assert trainer.step == 0  # everything filtered before micro-batches: no optimizer step at all
    assert len(trainer.ban) == 4  # 2 groups per epoch, and epoch 1 drew 2 new ones
    assert trainer.epoch == 2


def test_too_few_prompts_left_is_a_clear_error(tmp_path):
    from nftcore.demo import DemoDataset

    cfg = load_config(tiny_args(tmp_path, **{"filter.rule": "paper", "filter.ban_prompts": True}))
    trainer = Trainer(cfg, reward_fn=saturated_reward, echo=False)
    trainer.family.train_dataset = DemoDataset(3, size=trainer.family.policy.demo.image_size)
    with pytest.raises(ConfigError, match="cannot draw epoch 1.s prompts.*2 banned"):
        trainer.train()


class NaNLoss:
    """nft_loss, except that the calls in `bad` return a NaN loss (as a diverged model would)."""

    def __init__(self, bad):
        from nftcore.ops import nft_loss

        self.calls, self.bad, self.inner = 0, set(bad), nft_loss

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        bad = self.calls in self.bad
        self.calls += 1
        return out._replace(loss=out.loss * float("nan")) if bad else out


def test_nan_loss_skips_the_step_and_counts_it(tmp_path):
    trainer, result = run_tiny(tmp_path, loss_fn=NaNLoss(bad={0}), **{"run.epochs": 1})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["nan_skipped"] for r in rows] == [1, 0]
    assert rows[0]["step"] == 0 and rows[1]["step"] == 1  # the skipped step did not count
    assert result["nan_skipped"] == 1 and trainer.step == 1


def test_nan_losses_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        cfg = load_config(tiny_args(tmp_path))
        Trainer(cfg, loss_fn=NaNLoss(bad=range(1000)), max_nan_steps=2, echo=False).train()


class NaNVelocity:
    """The real nft_loss, fed a NaN policy velocity on the calls in `bad` (what diverged weights produce): nft_loss
    itself refuses it, and the trainer must skip the step rather than die."""

    def __init__(self, bad):
        from nftcore.ops import nft_loss

        self.calls, self.bad, self.inner = 0, set(bad), nft_loss

    def __call__(self, v_theta, *args, **kwargs):
        bad = self.calls in self.bad
        self.calls += 1
        return self.inner(v_theta * float("nan") if bad else v_theta, *args, **kwargs)


def test_a_nan_velocity_skips_the_step_it_is_in(tmp_path):
    # T_train = 2 calls per micro-batch, one micro-batch per step: call 1 is step 1's second timestep.
    trainer, result = run_tiny(tmp_path, loss_fn=NaNVelocity(bad={1}), **{"run.epochs": 1})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["nan_skipped"] for r in rows] == [1, 0] and rows[0]["loss"] is None  # NaN is written as null
    assert result["nan_skipped"] == 1 and trainer.step == 1


def test_a_diverging_learning_rate_stops_the_run_naming_it_and_saves_no_nan(tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(NonFiniteLossError, match=r"optim.lr = 1e\+06"):
        run_tiny(tmp_path, **{"optim.lr": 1e6, "optim.max_grad_norm": 0.0, "run.epochs": 6})
    saved = sorted((tmp_path / "checkpoints").glob("epoch-*/lora_ema/peft/adapter_model.safetensors"))
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = load_config(tiny_args(tmp_path, **{"run.epochs": 1}))
    trainer = Trainer(cfg, echo=False)
    with torch.no_grad():
        trainer.params[0].fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="no checkpoint written"):
        trainer.save()
    assert not any((tmp_path / "checkpoints").glob("epoch-*"))


def test_rollout_noise_does_not_depend_on_batching():
    from nftcore.trainer.seeding import rollout_noise

    whole = rollout_noise(3, 1, [0, 1, 2, 3], (4, 5))
    parts = torch.cat([rollout_noise(3, 1, [0, 1], (4, 5)), rollout_noise(3, 1, [2, 3], (4, 5))])
    assert torch.equal(whole, parts)


def write_golden(out: Path) -> None:
    run_tiny(out)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"args": tiny_args("OUT"), "loss": loss_trace(out)}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {loss_trace(out)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-golden"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_golden(Path(tmp))
    else:
        sys.exit("usage: python tests/test_trainer.py --write-golden")
