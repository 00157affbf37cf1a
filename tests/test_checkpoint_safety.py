"""Run folders and checkpoints under misuse and damage: a new run in an old run's folder, a resume with a changed
config, a crafted `.metadata`, truncated or flipped checkpoint files, an unparseable trainer.json, an unwritable
checkpoint folder.

In-process runs use the tiny demo settings of test_trainer.py (a few seconds each); one test launches 2-rank torchrun
jobs to check that the ranks agree on the run folder and on a fallback checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from nftcore.config import ConfigError, load_config
from nftcore.trainer import Trainer, read_metrics
from nftcore.trainer import checkpoint as ckpt
from nftcore.trainer.checkpoint import CheckpointError
from tests.helpers.jobs import TORCHRUN, launch
from tests.helpers.trainer import loss_trace, run_tiny, tiny_args


def run(out, *, finetune=None, **overrides) -> tuple[Trainer, dict]:
    """`run_tiny` with the trainer's console lines on (tests read them with capsys)."""
    cfg = load_config(tiny_args(out, **overrides))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, echo=True, finetune=finetune)
    return trainer, trainer.train()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def rehash(path: Path) -> None:
    """Rewrite `path`'s checksums.json for its current files, as someone who edits a checkpoint on purpose would."""
    ckpt.write_checksums(path, ckpt.file_checksums(path, ckpt.checkpoint_files(path)))


class Marker:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint would do with a real command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------------- run folders


def test_a_new_run_in_an_old_run_folder_is_refused(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    before = loss_trace(tmp_path)
    with pytest.raises(ConfigError) as err:
        run_tiny(tmp_path, **{"run.epochs": 1, "run.seed": 8})
    message = one_line(err)
    assert str(tmp_path) in message and "--run.overwrite=true" in message and "--resume latest" in message
    assert loss_trace(tmp_path) == before  # nothing emptied
    assert (tmp_path / "checkpoints" / "epoch-000001" / "COMPLETE").is_file()


def test_overwrite_deletes_only_the_old_runs_own_files(tmp_path, capsys):
    run_tiny(tmp_path, **{"run.epochs": 2, "metrics.image_every": 1})
    assert (tmp_path / "images").is_dir()
    (tmp_path / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    run(tmp_path, **{"run.epochs": 1, "run.seed": 8, "run.overwrite": True})
    printed = capsys.readouterr().out
    assert "metrics.jsonl" in printed and "checkpoints/" in printed and "images/" in printed  # says what went
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-000001"]  # the old epoch-2 is gone
    assert not (tmp_path / "images").exists()
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 0]
    assert "seed = 8" in (tmp_path / "checkpoints" / "epoch-000001" / "config.toml").read_text()
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_resume_latest_before_the_first_checkpoint_starts_fresh_in_its_own_folder(tmp_path):
    straight = tmp_path / "straight"
    run_tiny(straight, **{"run.epochs": 1})
    out = tmp_path / "restarted"  # a job that died in epoch 0: metrics rows, an unfinished checkpoint folder
    (out / "checkpoints" / "epoch-000001").mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "step": 1, "loss": 123.0}) + "\n")
    trainer, _ = run_tiny(out, **{"run.epochs": 1, "checkpoint.resume": "latest"})
    assert trainer.epoch == 1 and loss_trace(out) == loss_trace(straight)


def test_overwrite_and_resume_latest_contradict(tmp_path):
    with pytest.raises(ConfigError, match="run.overwrite.*--resume latest"):
        run_tiny(tmp_path, **{"run.overwrite": True, "checkpoint.resume": "latest"})


def test_resuming_another_runs_checkpoint_needs_an_empty_folder(tmp_path):
    run_tiny(tmp_path / "a", **{"run.epochs": 1})
    run_tiny(tmp_path / "b", **{"run.epochs": 1})
    source = tmp_path / "a" / "checkpoints" / "epoch-000001"
    with pytest.raises(ConfigError) as err:  # b holds its own run: a's checkpoint would mix into it
        run_tiny(tmp_path / "b", **{"run.epochs": 2, "checkpoint.resume": str(source)})
    assert str(tmp_path / "b") in one_line(err)
    trainer, _ = run_tiny(tmp_path / "fork", **{"run.epochs": 2, "checkpoint.resume": str(source)})
    assert trainer.epoch == 2 and [r["epoch"] for r in read_metrics(tmp_path / "fork" / "metrics.jsonl")] == [1, 1]


def test_an_unwritable_checkpoint_folder_is_found_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be\n")
    with pytest.raises(ConfigError) as err:
        run_tiny(tmp_path, **{"run.epochs": 1})
    assert str(tmp_path / "checkpoints") in one_line(err)
    assert not (tmp_path / "metrics.jsonl").exists()  # not one step was run


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_found_before_training(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            run_tiny(tmp_path, **{"run.epochs": 1})
    finally:
        (tmp_path / "checkpoints").chmod(0o700)


# ---------------------------------------------------------------------------------------------------- resume config


def test_resume_refuses_what_the_weights_and_the_trajectory_depend_on(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    with pytest.raises(ConfigError) as err:
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest", "lora.include_mlp": False,
                              "lora.alpha": 8.0, "run.seed": 8})
    message = one_line(err)
    assert "lora.include_mlp true → false" in message and "lora.alpha 4.0 → 8.0" in message
    assert "run.seed 7 → 8" in message and "run.epochs" not in message
    with pytest.raises(ConfigError, match=r"lora.rank 2 → 4"):  # not a DCP traceback
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest", "lora.rank": 4})
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 0]  # refused before touching it


def test_resume_allows_and_logs_what_may_change_and_applies_a_new_lr(tmp_path, capsys):
    run_tiny(tmp_path, **{"run.epochs": 1})
    capsys.readouterr()
    trainer, _ = run(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest", "optim.lr": 5e-4,
                                  "sampling.batch_size": 2, "metrics.log_every": 2, "run.name": "again"})
    printed = capsys.readouterr().out
    for change in ("run.epochs 1 → 2", "optim.lr 0.001 → 0.0005", "sampling.batch_size 1 → 2",
                   "metrics.log_every 1 → 2", 'run.name "demo" → "again"'):
        assert change in printed
    assert trainer.epoch == 2 and trainer.optimizer.param_groups[0]["lr"] == 5e-4


def test_resume_refuses_the_other_kind_of_fine_tuning(tmp_path):
    run_tiny(tmp_path, finetune="full", **{"run.epochs": 1, "nft.kl_weight": 1e-2})
    with pytest.raises(ConfigError, match="full fine-tuning.*LoRA"):
        run_tiny(tmp_path, **{"run.epochs": 2, "nft.kl_weight": 1e-2, "checkpoint.resume": "latest"})


def test_a_checkpoint_without_a_readable_config_is_a_clear_error(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    path = tmp_path / "checkpoints" / "epoch-000001"
    (path / "config.toml").write_text("[lora\nrank = ")
    (path / "checksums.json").unlink()  # as a checkpoint written before manifests existed
    with pytest.raises(CheckpointError) as err:
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(path)})
    assert str(path / "config.toml") in one_line(err)
    (path / "config.toml").unlink()
    with pytest.raises(CheckpointError, match="config.toml"):
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(path)})


def test_a_bad_resume_path_is_a_config_error(tmp_path):
    run_tiny(tmp_path / "run", **{"run.epochs": 1})
    with pytest.raises(ConfigError, match="no such"):
        run_tiny(tmp_path / "new", **{"checkpoint.resume": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="epoch-000001"):  # a run folder, not a checkpoint: name the newest one
        run_tiny(tmp_path / "new", **{"checkpoint.resume": str(tmp_path / "run")})


# ---------------------------------------------------------------------------------------------------- pickles


def test_a_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    path = tmp_path / "checkpoints" / "epoch-000001"
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Marker(marker)))
    rehash(path)  # whoever crafts a checkpoint rewrites its manifest too
    with pytest.raises(CheckpointError) as err:
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(path)})
    message = one_line(err)
    assert str(path / ".metadata") in message and "system" in message
    assert not marker.exists()


def test_real_metadata_passes_the_restricted_unpickler(tmp_path):
    run_tiny(tmp_path / "lora", **{"run.epochs": 1})
    run_tiny(tmp_path / "full", finetune="full", **{"run.epochs": 1})
    for kind in ("lora", "full"):
        metadata = ckpt.SafeFileSystemReader(tmp_path / kind / "checkpoints" / "epoch-000001").read_metadata()
        assert any(key.startswith("optim.state.") for key in metadata.state_dict_metadata)


def test_non_tensor_items_are_loaded_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(Marker(marker), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.SafeLoadPlanner().load_bytes(None, buffer)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- damage


def test_a_truncated_shard_is_named_and_latest_falls_back(tmp_path, capsys):
    run_tiny(tmp_path, **{"run.epochs": 2})
    before = loss_trace(tmp_path)
    newest = tmp_path / "checkpoints" / "epoch-000002"
    manifest = json.loads((newest / "checksums.json").read_text())
    assert {".metadata", "__0_0.distcp", "trainer.json", "config.toml"} <= set(manifest["files"])
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:  # the user named this one: no fallback
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(newest)})
    assert str(shard) in one_line(err)
    capsys.readouterr()
    trainer, _ = run(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest"})
    printed = capsys.readouterr().out
    assert "skipping" in printed and "epoch-000002" in printed and "__0_0.distcp" in printed
    assert trainer.epoch == 2 and loss_trace(tmp_path) == before  # epoch 1 replayed from epoch-000001


def test_a_flipped_byte_is_found_by_its_checksum(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    path = tmp_path / "checkpoints" / "epoch-000001"
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp.*sha256"):
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(path)})


def test_a_damaged_checkpoint_without_a_manifest_fails_in_one_line_naming_it(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 2})
    newest = tmp_path / "checkpoints" / "epoch-000002"
    (newest / "checksums.json").unlink()
    shard = newest / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:  # found from .metadata's offsets, before DCP reads
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(newest)})
    assert str(shard) in one_line(err) and "truncated" in str(err.value)
    shard.write_bytes(bytes(size))  # the right size, all zeros
    with pytest.raises(CheckpointError) as err:  # DCP's own error (a BaseException there), in one line
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": str(newest)})
    assert f"checkpoint {newest} failed to load" in one_line(err)
    trainer, _ = run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest"})
    assert trainer.epoch == 2


def test_an_unparseable_trainer_json_is_skipped_not_fatal(tmp_path, capsys):
    run_tiny(tmp_path, **{"run.epochs": 2})
    (tmp_path / "checkpoints" / "epoch-000001" / "trainer.json").write_text('{"step": ')
    stray = tmp_path / "checkpoints" / "someone-elses"
    stray.mkdir()
    (stray / "COMPLETE").write_text("ok\n")
    (stray / "trainer.json").write_text("not json")
    capsys.readouterr()
    trainer, _ = run(tmp_path, **{"run.epochs": 3, "checkpoint.resume": "latest", "checkpoint.keep_latest": 1})
    printed = capsys.readouterr().out
    assert trainer.epoch == 3 and "trainer.json" in printed
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-000001", "epoch-000003", "someone-elses"]  # pruned epoch-2, left what it cannot read


class Killed(BaseException):
    """Stands in for kill -9: nothing catches it, and the files are left as they were at that point."""


@pytest.mark.parametrize("point", ["shards", "exports", "manifest", "prune"])
def test_a_crash_at_any_point_of_a_save_resumes_to_the_same_trace(tmp_path, monkeypatch, point):
    """Dies while writing epoch-000002: after its DCP shards, in the exports, with checksums.json written but no
    COMPLETE, or after COMPLETE while pruning epoch-000001 (half removed). `--resume latest` then gives the
    uninterrupted run's losses."""
    args = {"run.epochs": 2, "checkpoint.keep_latest": 1}
    run_tiny(tmp_path / "straight", **args)
    saving = lambda path: Path(path).name == "epoch-000002"  # noqa: E731

    def fail_after(real):
        def wrapped(path, *rest, **kwargs):
            result = real(path, *rest, **kwargs)
            if saving(path):
                raise Killed
            return result
        return wrapped

    def fail_before(real, folder_arg=0):
        def wrapped(*args, **kwargs):
            if saving(args[folder_arg]):
                raise Killed
            return real(*args, **kwargs)
        return wrapped

    def half_remove(path):
        (path / ckpt.COMPLETE).unlink()
        (path / "__0_0.distcp").unlink()
        raise Killed

    patch = {"shards": (ckpt, "file_checksums", fail_before(ckpt.file_checksums)),
             "exports": (Trainer, "_export_lora", fail_before(lambda self, path: None, folder_arg=1)),
             "manifest": (ckpt, "write_checksums", fail_after(ckpt.write_checksums)),
             "prune": (ckpt, "_remove_checkpoint", half_remove)}[point]
    out = tmp_path / "crashed"
    with monkeypatch.context() as patched:
        patched.setattr(*patch)
        with pytest.raises(Killed):
            run_tiny(out, **args)
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / ckpt.COMPLETE).exists())
    assert complete == (["epoch-000002"] if point == "prune" else ["epoch-000001"])
    run_tiny(out, **{**args, "checkpoint.resume": "latest"})
    assert loss_trace(out) == loss_trace(tmp_path / "straight")


def test_latest_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    run_tiny(tmp_path, **{"run.epochs": 1})
    shard = tmp_path / "checkpoints" / "epoch-000001" / "__0_0.distcp"
    shard.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        run_tiny(tmp_path, **{"run.epochs": 2, "checkpoint.resume": "latest"})
    assert "epoch-000001" in one_line(err)


# ---------------------------------------------------------------------------------------------------- two ranks


def _job(args: list[str]) -> subprocess.CompletedProcess:
    return launch(["-m", "nftcore.train", *args], nproc=2, timeout=300, check=False)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_two_ranks_agree_on_the_folder_and_on_the_fallback_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = tiny_args(out, **{"run.epochs": 2})
    first = _job(args)
    assert first.returncode == 0, first.stderr[-4000:]
    before = loss_trace(out)
    newest = out / "checkpoints" / "epoch-000002"
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(json.loads((newest / "checksums.json").read_text())["files"])
    shard = newest / "__1_0.distcp"  # rank 1's shard, hashed by rank 1 at save time
    shard.write_bytes(shard.read_bytes()[:500])

    resumed = _job([*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "skipping" in resumed.stdout and "__1_0.distcp" in resumed.stdout
    assert len(loss_trace(out)) == len(before) and max(abs(a - b) for a, b in zip(loss_trace(out), before)) < 1e-6

    refused = _job(args)  # a new run in this folder: both ranks stop, none waits for the other
    assert refused.returncode != 0 and "already holds a run" in refused.stderr
