"""Full fine-tuning (`model.finetune = "full"`): the config key and its world-size check, fp32 master weights under a
bf16 model, FSDP2 on two gloo ranks against one process, kill -9 + resume, and the diffusers export of the EMA.

The runs use the tiny settings of tests/helpers/trainer.py, the demo's defaults, or the tiny random FLUX.1-Kontext
pipeline of nftcore/testing/tiny_pipelines.py judged over HTTP by a stand-in judge (the image's mean brightness); one
thread per process.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from nftcore import train as train_module
from nftcore.config import ConfigError, load_config
from nftcore.trainer import DistEnv, Trainer, read_metrics
from tests.helpers.jobs import TORCHRUN, Gated, run_job
from tests.helpers.tolerances import relative_gap
from tests.helpers.trainer import run_tiny, tiny_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")

FULL = {"model.finetune": "full"}
FULL_LR = 1e-5  # the demo's lr (3e-3) is tuned for LoRA; every weight at that rate wrecks the demo policy


def losses(out) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


def tensor_meta(checkpoint) -> dict[str, torch.dtype]:
    """Every tensor's dtype in a DCP checkpoint, by its flattened key ('weights.theta.…', 'optim.state.…')."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {key: meta.properties.dtype for key, meta in metadata.items() if hasattr(meta, "properties")}


# ----------------------------------------------------------------------------------------------------- the config


def test_finetune_is_a_config_key_with_help_recipes_and_resume_check():
    from nftcore.config import RECIPES, format_help

    assert load_config([]).model.finetune == "lora"
    assert load_config(["--model.finetune", "full"]).model.finetune == "full"
    with pytest.raises(ConfigError, match="model.finetune"):
        load_config(["--model.finetune=partial"])
    assert "--model.finetune" in format_help(load_config([]))
    assert all(recipe().model.finetune == "lora" for recipe in RECIPES.values())
    from nftcore.trainer.run_folder import config_changes

    refused, _ = config_changes(load_config([]), load_config(["--model.finetune=full"]))
    assert refused == ["model.finetune \"lora\" → \"full\""]


def test_full_finetuning_of_a_replicated_transformer_on_several_ranks_is_refused(tmp_path, monkeypatch, capsys):
    cfg = load_config([*tiny_args(tmp_path), "--model.finetune=full", "--parallel.shard_transformer=false"])
    assert cfg.validate(world_size=1) is cfg  # one rank replicates nothing
    load_config([*tiny_args(tmp_path), "--model.finetune=full"]).validate(world_size=2)  # sharded: fine
    reason = ("model.finetune='full' on 2 ranks with parallel.shard_transformer=false: full weights replicated on "
              "every rank cost 2× memory and an all-reduce of every weight's gradient; set "
              "parallel.shard_transformer=true")
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=2)
    assert reason in str(err.value)
    with pytest.raises(ConfigError, match="parallel.shard_transformer=true"):  # before any model is loaded
        Trainer(cfg, env=DistEnv(rank=0, world_size=2), echo=False)
    # The command line: one line, exit code 2 (a fake rank 0 of two; nothing collective runs before the check).
    monkeypatch.setattr(train_module, "init_distributed", lambda cfg: DistEnv(rank=0, world_size=2))
    monkeypatch.setattr(train_module, "prepare_run_folder", lambda cfg, env: None)
    assert train_module.main([*tiny_args(tmp_path), "--model.finetune=full",
                              "--parallel.shard_transformer=false"]) == 2
    assert reason in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- precision


def test_a_1e_6_step_moves_bf16_initialised_weights_held_as_fp32_masters(tmp_path):
    """One AdamW step of lr 1e-6 moves each weight by about 1e-6, far below bf16's spacing near the demo's weights
    (~2e-4 at 0.05): a bf16 parameter would round nearly every update away; the fp32 masters keep them."""
    trainer, _ = run_tiny(tmp_path, **FULL, **{"model.dtype": "bf16", "optim.lr": 1e-6, "run.epochs": 1,
                                               "optim.steps_per_epoch": 1})
    weights = trainer.weights
    assert trainer.step == 1 and len(trainer.params) == len(list(weights.model.parameters()))
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert {p.dtype for m in (weights.old, weights.ref) for p in m.parameters()} == {torch.bfloat16}
    assert {v.dtype for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert {v.dtype for v in trainer.ema.shadow.values()} == {torch.float32}
    start = dict(weights.ref.named_parameters())  # the frozen bf16 base: where the masters started, exactly
    total = sum(p.numel() for p in trainer.params)
    moved = sum(int((p != start[n].float()).sum()) for n, p in weights.model.named_parameters())
    kept_in_bf16 = sum(int((p.bfloat16() != start[n]).sum()) for n, p in weights.model.named_parameters())
    print(f"moved {moved / total:.4f} of the masters; in bf16 {kept_in_bf16 / total:.4f} would have moved")
    assert moved > 0.99 * total and kept_in_bf16 < 0.05 * total
    assert isinstance(trainer.autocast(), torch.autocast)  # one process: the fp32 masters compute in bf16


def test_lora_adapters_stay_fp32_on_a_bf16_base(tmp_path):
    trainer, _ = run_tiny(tmp_path, **{"model.dtype": "bf16", "run.epochs": 1, "optim.steps_per_epoch": 1})
    adapters = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert adapters and {p.dtype for p in adapters} == {torch.float32} == {p.dtype for p in trainer.params}
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {v.dtype for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}


# ----------------------------------------------------------------------------------------------------- export


def test_the_export_is_a_sharded_diffusers_qwen_transformer_that_reproduces_ours(tmp_path):
    """`FullWeights.export`'s writer on a tiny random Qwen-Image transformer with moved weights: diffusers' own
    `from_pretrained` reads the shards through the index and gives our output."""
    diffusers = pytest.importorskip("diffusers")
    from nftcore.models import MMDiT
    from nftcore.models.checkpoint_io import INDEX_NAME, save_pretrained
    from nftcore.testing.tiny_pipelines import randomize

    base = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                 axes_dims_rope=(4, 6, 6))
    randomize(base, 0).save_pretrained(tmp_path / "base")
    ours = MMDiT.from_pretrained(tmp_path / "base")
    randomize(ours, 1, scale=0.2)  # "trained": every weight, the fused QKV included, differs from the base
    save_pretrained(ours, tmp_path / "export", max_shard_size="40KB")
    index = json.loads((tmp_path / "export" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    theirs = diffusers.QwenImageTransformer2DModel.from_pretrained(tmp_path / "export").eval()
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(2, 2 * 8, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 32,
             generator=g), encoder_hidden_states_mask=torch.ones(2, 5), timestep=torch.tensor([0.3, 0.8]),
             img_shapes=[[(1, 2, 4), (1, 2, 4)]] * 2)
    with torch.no_grad():
        want, got = ours(**x).sample, theirs(**x).sample
        moved = (want - base.eval()(**x).sample).abs().max()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() < moved


# ------------------------------------------------------------------------------------------------- multi-rank


@needs_torchrun
def test_fsdp2_full_finetuning_of_the_demo_matches_one_process(tmp_path):
    """`python -m nftcore.train --model.finetune=full` on the demo's defaults (64 samples, 4 steps per epoch, an EMA
    evaluation at the end) on one process and FSDP2 over two gloo ranks: the same loss trace, evaluation and exported
    EMA transformer, within what fp32 rounding alone moves the one-process run (other rollout batches)."""
    from safetensors.torch import load_file

    args = {**FULL, "optim.lr": FULL_LR, "run.epochs": 2, "eval.every": 2, "metrics.progress": False}
    run_job([f"--{k}={v}" for k, v in {**args, "run.out": tmp_path / "one"}.items()])
    run_job([f"--{k}={v}" for k, v in {**args, "run.out": tmp_path / "two"}.items()], nproc=2)
    rebatched = load_config([f"--{k}={v}" for k, v in {**args, "run.out": tmp_path / "rebatched",
                                                         "sampling.batch_size": 11}.items()])
    Trainer(rebatched, echo=False).train()
    trace = {name: losses(tmp_path / name) for name in ("one", "rebatched", "two")}
    rounding = relative_gap(trace["one"], trace["rebatched"])
    bound = 4 * rounding + 8 * torch.finfo(torch.float32).eps
    print("rounding", rounding, "two ranks", relative_gap(trace["one"], trace["two"]))
    assert len(trace["one"]) == 8 and relative_gap(trace["one"], trace["two"]) <= bound
    (one,), (rebatched,), (two,) = (read_metrics(tmp_path / name / "eval.jsonl") for name in trace)
    eval_rounding = abs(one["eval_reward"] - rebatched["eval_reward"]) / abs(one["eval_reward"])
    assert abs(one["eval_reward"] - two["eval_reward"]) / abs(one["eval_reward"]) <= bound + eval_rounding
    exports = [load_file(tmp_path / name / "checkpoints" / "epoch-000002" / "ema" / "transformer" /
                         "diffusion_pytorch_model.safetensors") for name in ("one", "two")]
    assert exports[0].keys() == exports[1].keys()
    assert max((exports[0][k] - exports[1][k]).abs().max().item() for k in exports[0]) < 1e-4
    meta = tensor_meta(tmp_path / "two" / "checkpoints" / "epoch-000002")
    assert {dtype for key, dtype in meta.items() if key.startswith(("weights.theta.", "ema.", "optim.state."))
            and not key.endswith(".step")} == {torch.float32}


def test_kill_minus_9_then_resume_latest_is_exact(tmp_path):
    """A bf16 model (fp32 masters, bf16 θ_old and reference, fp32 EMA and AdamW state in the checkpoint), killed in
    epoch 1's rollouts: `--resume latest` gives exactly the loss trace of an uninterrupted run."""
    args = {**FULL, "model.dtype": "bf16", "optim.lr": FULL_LR, "run.epochs": 2, "checkpoint.save_every": 1,
            "nft.kl_weight": 1e-2}
    run_tiny(tmp_path / "straight", **args)  # in process, one thread: the job's numbers (see test_trainer.py)
    out = tmp_path / "killed"
    job = Gated(tmp_path, tiny_args(out, **args), call=5)  # K·G = 4 reward calls of one per epoch: epoch 1
    (pid,) = job.wait()
    os.kill(pid, signal.SIGKILL)
    job.finish()
    assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()] == ["epoch-000001"]
    meta = tensor_meta(out / "checkpoints" / "epoch-000001")
    theta = {dtype for key, dtype in meta.items() if key.startswith("weights.theta.")}
    old = {dtype for key, dtype in meta.items() if key.startswith("weights.old.")}
    moments = {dtype for key, dtype in meta.items() if key.startswith("optim.state.") and not key.endswith(".step")}
    ema = {dtype for key, dtype in meta.items() if key.startswith("ema.")}
    assert theta == moments == ema == {torch.float32} and old == {torch.bfloat16}
    run_job([*tiny_args(out, **args), "--resume", "latest"])
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    print("straight", straight, "\nresumed ", resumed)
    assert len(resumed) == 4 and resumed == straight


class Brightness:
    """A stand-in judge for the HTTP server: each edit's mean brightness (cheap, deterministic, varies by edit)."""

    def score(self, edited, sources, prompts, requirements):
        return torch.tensor([float(np.asarray(e, dtype=np.float32).mean()) / 255 for e in edited])


@needs_torchrun
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP, read back in this process
def test_a_tiny_edit_r1_family_full_finetunes_on_one_and_two_ranks(tmp_path):
    """FLUX.1-Kontext (tiny, random) with `--model.finetune=full` from the command line, one process and two FSDP2
    ranks: the same rewards and loss; the exported EMA transformer loads in diffusers and gives the output of our
    MMDiT with the checkpoint's EMA weights (read back from the DCP checkpoint, not from the export)."""
    diffusers = pytest.importorskip("diffusers")
    import torch.distributed.checkpoint as dcp

    from nftcore.models import MMDiT
    from nftcore.reward.server import RewardServer
    from nftcore.testing.tiny_pipelines import build_kontext_pipeline
    from nftcore.trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
    from tests.helpers.edit_runs import edit_args
    from tests.helpers.tiny_transformers import assert_close, flux_inputs

    folder = build_kontext_pipeline(tmp_path / "kontext")
    rows = {}
    with RewardServer(Brightness(), port=0) as server:
        for nproc in (1, 2):
            run = tmp_path / f"ranks-{nproc}"
            run_job(edit_args(run, folder, "flux", **FULL, **{"reward.backend": "server",
                                                              "reward.server_url": server.url}), nproc=nproc)
            (rows[nproc],) = read_metrics(run / "out" / "metrics.jsonl")
    print(rows)
    for key in ("reward_mean", "reward_std"):
        assert rows[2][key] == pytest.approx(rows[1][key], abs=1e-5), key
    assert abs(rows[2]["loss"] - rows[1]["loss"]) <= 1e-5 * max(1.0, abs(rows[1]["loss"]))

    checkpoint = tmp_path / "ranks-2" / "out" / "checkpoints" / "epoch-000001"
    ours = MMDiT.from_pretrained(folder / "transformer").eval()
    x = flux_inputs(ours.config)
    x["guidance"] = torch.full((2,), 2.5)
    with torch.no_grad():
        base = ours(**x).sample
        ema = {name: p.detach() for name, p in ours.named_parameters()}
        dcp.load({"ema": ema}, storage_reader=SafeFileSystemReader(checkpoint), planner=SafeLoadPlanner(),
                 no_dist=True)
        want = ours(**x).sample
        theirs = diffusers.FluxTransformer2DModel.from_pretrained(checkpoint / "ema" / "transformer").eval()
        assert_close(theirs(**x).sample, want, base)
