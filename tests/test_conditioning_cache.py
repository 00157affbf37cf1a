"""The conditioning cache (data.cache_conditioning = memory | disk) and `python -m nftcore.precompute`.

Demo runs use the tiny random policy (tests/helpers/trainer.py's `tiny_args`); the real families use the tiny random
FLUX.1-Kontext and Qwen-Image-Edit pipelines of nftcore/testing/tiny_pipelines.py on a tiny Edit-R1 folder. What is
checked: the cached runs give today's numbers (bitwise where the encoder sees the same batches, within its rounding
where it does not), a row is encoded once per run (memory) or once ever (disk), stale and damaged entries are warned
about and recomputed, a precomputed cache spares loading the text encoders, and ranks with sharded encoders stay in
step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from nftcore.config import ConfigError, load_config
from nftcore.demo.family import DemoFamily
from nftcore.trainer import Trainer, read_metrics
from nftcore.trainer.conditioning_cache import (
    SUFFIX,
    ConditioningCache,
    directory_of,
    encode_entry,
    entry_key,
    identity_of,
)
from tests.helpers.trainer import loss_trace, tiny_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = torch.finfo(torch.float32).eps
ENCODER_ULPS = 4
"""How far a demo conditioning value moves when its row is encoded in another batch: the pooled projection's GEMM
rounds differently for other row counts, by about one fp32 ulp (measured: ≤ 1.5 eps of the largest value)."""
AMPLIFICATION = 100
"""How much the ODE and the x0-weighted loss amplify last-bit changes (tests/test_trainer.py's golden-trace note)."""


def run_demo(out, mode, *, cache_dir=None, **overrides):
    """A tiny demo run with the cache in `mode`; returns (trainer, result, encoder calls as (epoch, rows))."""
    options = {"data.cache_conditioning": mode, **overrides}
    if cache_dir is not None:
        options["data.cache_dir"] = cache_dir
    trainer = Trainer(load_config(tiny_args(out, **options)), echo=False)
    calls = count_encoder_calls(trainer.family, lambda: trainer.epoch)
    return trainer, trainer.train(), calls


def count_encoder_calls(family, when=lambda: None) -> list:
    """Wrap `family.conditioning` (what the cache calls on a miss) to record (when(), rows) per call."""
    calls, encode = [], family.conditioning

    def counted(samples):
        calls.append((when(), len(samples)))
        return encode(samples)

    family.conditioning = counted
    return calls


def numbers(out, result) -> list[float]:
    """The run's losses, epoch rewards and evaluation rewards, in order."""
    return [*loss_trace(out), *result["epoch_rewards"], *(reward for _, reward in result["eval_rewards"])]


def max_relative_gap(a, b) -> float:
    """max |a - b| / max |a| over every tensor field of two conditionings."""
    gaps = []
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if torch.is_tensor(x):
            assert x.shape == y.shape and x.dtype == y.dtype, field.name
            gaps.append(float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp_min(1e-30)))
        else:
            assert x == y, field.name
    return max(gaps)


def demo_family(path="tiny", **overrides):
    options = {"model.path": path, "sampling.resolution": 16, **overrides}
    return DemoFamily(load_config([f"--{k}={v}" for k, v in options.items()]), torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ demo: numbers


def test_cached_runs_equal_off_bitwise_when_every_encoder_call_is_one_row(tmp_path):
    """sampling.batch_size = 1 and eval batches of distinct rows: the cache encodes exactly the batches 'off' does
    (one row; the eval batch itself), so rewards, losses and evaluations are bitwise today's."""
    eval_options = {"eval.every": 1, "eval.max_samples": 4, "eval.batch_size": 2}
    runs = {mode: run_demo(tmp_path / mode, mode, **eval_options) for mode in ("off", "memory", "disk")}
    off = numbers(tmp_path / "off", runs["off"][1])
    for mode in ("memory", "disk"):
        assert numbers(tmp_path / mode, runs[mode][1]) == off, mode
    # off: every rollout call (4 per epoch) and eval batch (2) encodes; the cache: each row once.
    assert len(runs["off"][2]) == 2 * (4 + 2)
    assert sum(rows for _, rows in runs["memory"][2]) == runs["memory"][0].conditioning.stats["encoded_rows"]
    assert len(runs["memory"][2]) < len(runs["off"][2])


def test_batched_rollouts_match_off_within_the_encoders_rounding(tmp_path):
    """sampling.batch_size = 4: 'off' encodes a group's K copies of a row together with other rows, the cache each
    distinct row once, so the demo encoder's GEMMs see other row counts. The conditioning then moves by about an
    ulp (asserted: ≤ ENCODER_ULPS eps), and rewards and losses by at most AMPLIFICATION times that."""
    family = demo_family()
    samples = [family.train_dataset[i] for i in (5, 5, 9, 9)]
    cache = ConditioningCache(family, "memory")
    assert max_relative_gap(family.conditioning(samples), cache(samples, [5, 5, 9, 9], "train")) <= ENCODER_ULPS * EPS

    tolerance = AMPLIFICATION * ENCODER_ULPS * EPS
    options = {"sampling.batch_size": 4, "eval.every": 1, "eval.max_samples": 4, "eval.batch_size": 2}
    (_, off, _), (_, cached, _) = (run_demo(tmp_path / mode, mode, **options) for mode in ("off", "memory"))
    a, b = numbers(tmp_path / "off", off), numbers(tmp_path / "memory", cached)
    assert len(a) == len(b) == 4 + 2 + 2
    assert all(abs(x - y) <= tolerance * abs(x) for x, y in zip(a, b)), (a, b)


def test_later_epochs_and_evaluations_encode_nothing(tmp_path, monkeypatch):
    """With two train rows (G = 2: both drawn every epoch) and three eval rows, 'memory' encodes each row once: the
    first epoch's two rollout rows (four samples, a group's K samples sharing one encoder row) and one evaluation
    (3 rows in batches of 2); the second epoch and its evaluation encode nothing."""
    monkeypatch.setattr("nftcore.demo.family.DEMO_TRAIN_TASKS", 2)
    monkeypatch.setattr("nftcore.demo.family.DEMO_EVAL_TASKS", 3)
    options = {"eval.every": 1, "eval.batch_size": 2, "sampling.batch_size": 2}
    trainer, _, calls = run_demo(tmp_path / "memory", "memory", **options)
    assert calls == [(0, 1), (0, 1), (0, 2), (0, 1)]
    assert trainer.conditioning.stats["encoded_rows"] == 5
    _, _, off_calls = run_demo(tmp_path / "off", "off", **options)
    assert [e for e, _ in off_calls].count(1) == 4 and sum(rows for _, rows in off_calls) == 2 * (4 + 3)


def test_disk_entries_outlive_the_run(tmp_path):
    """A second run (another Trainer, another run folder) over the same cache folder encodes nothing and trains to
    the same numbers."""
    cache = tmp_path / "cache"
    trainer, first, calls = run_demo(tmp_path / "a", "disk", cache_dir=cache)
    files = sorted(cache.glob(f"*{SUFFIX}"))
    assert calls and len(files) == trainer.conditioning.stats["encoded_rows"] > 0
    again, second, calls = run_demo(tmp_path / "b", "disk", cache_dir=cache)
    assert calls == [] and again.conditioning.stats["encoded_rows"] == 0
    assert numbers(tmp_path / "b", second) == numbers(tmp_path / "a", first)
    assert sorted(cache.glob(f"*{SUFFIX}")) == files


# ------------------------------------------------------------------------------------------------ stale and corrupt


def disk_cache(family, directory, messages, **identity_changes):
    identity = {**identity_of(family), **identity_changes}
    return ConditioningCache(family, "disk", identity=identity, directory=directory, warn=messages.append)


def entry_path(cache, sample) -> Path:
    return cache.path(entry_key(cache.identity, sample.sample_id, sample.prompt))


def test_entries_of_other_settings_or_content_are_not_used(tmp_path):
    """Another identity (here the resolution) has its own entries; a file under this identity's name that names
    another identity, or was made from other pixels, is stale: warned about with its name, recomputed, rewritten."""
    family = demo_family()
    samples, rows = [family.train_dataset[i] for i in (0, 1)], [0, 1]
    messages: list[str] = []
    first = disk_cache(family, tmp_path, messages)
    first(samples, rows, "train")
    other = disk_cache(family, tmp_path, messages, resolution=32)
    calls = count_encoder_calls(family)
    other(samples, rows, "train")
    assert calls == [(None, 2)] and len(list(tmp_path.glob(f"*{SUFFIX}"))) == 4 and messages == []

    # A file that claims another identity under this identity's name (a copied or hand-edited file).
    target = entry_path(first, samples[0])
    target.write_bytes(entry_path(other, samples[0]).read_bytes())
    fresh = disk_cache(family, tmp_path, messages)
    calls.clear()
    cond = fresh(samples, rows, "train")
    assert calls == [(None, 1)] and len(messages) == 1
    assert "stale entry" in messages[0] and str(target) in messages[0] and "resolution" in messages[0]
    assert max_relative_gap(family.conditioning(samples), cond) <= ENCODER_ULPS * EPS

    # The same row (id, instruction) with other pixels: the entry's content hash no longer matches.
    changed = dataclasses.replace(samples[0], image=1.0 - samples[0].image)
    cond = fresh([changed], [0], "train")
    assert len(messages) == 2 and "another source image" in messages[1] and str(target) in messages[1]
    assert torch.equal(cond.source_latents, family.conditioning([changed]).source_latents)
    calls.clear()
    fresh([changed], [0], "train")  # rewritten: now valid for the new pixels
    assert calls == [] and len(messages) == 2


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(at: int):
    def damage(data: bytes) -> bytes:
        i = at if at >= 0 else len(data) + at
        return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
    return damage


def _flip_header(fraction: float):
    """Flip one byte of the JSON header (whose key order safetensors does not fix): tensor names, shapes, offsets,
    the identity, the content hash or an informational item, every one of them is checked or checksummed."""
    def damage(data: bytes) -> bytes:
        return _flip(8 + int(int.from_bytes(data[:8], "little") * fraction))(data)
    return damage


DAMAGE = {
    "truncated": _truncate,
    "empty": lambda data: b"",
    "flipped data byte": _flip(-5),  # inside the last tensor
    **{f"flipped header byte at {f:.0%}": _flip_header(f) for f in (0.02, 0.25, 0.5, 0.75, 0.98)},
    "bad header length": lambda data: (10 ** 12).to_bytes(8, "little") + data[8:],
}


@pytest.mark.parametrize("damage", [*DAMAGE, "wrong shapes"])
def test_a_damaged_entry_is_warned_about_once_and_recomputed(tmp_path, damage):
    family = demo_family()
    samples, rows = [family.train_dataset[i] for i in (3, 4)], [3, 4]
    messages: list[str] = []
    cache = disk_cache(family, tmp_path, messages)
    reference = cache(samples, rows, "train")
    path = entry_path(cache, samples[1])
    good = path.read_bytes()
    if damage == "wrong shapes":  # a well-formed entry (checksum and all) whose source tokens do not fit the grid
        one = family.conditioning(samples[1:])
        short = dataclasses.replace(one, source_latents=one.source_latents[:, :-1])
        metadata = json.loads(good[8:8 + int.from_bytes(good[:8], "little")])["__metadata__"]
        bad = encode_entry(short, cache.identity, metadata["content"], samples[1].sample_id)
    else:
        bad = DAMAGE[damage](good)
    for attempt in range(2):  # damaged twice: recomputed twice, warned once
        path.write_bytes(bad)
        calls = count_encoder_calls(family)
        cond = cache(samples, rows, "train")
        assert calls == [(None, 1)], damage
        assert len(messages) == 1 and str(path) in messages[0] and "recomputing" in messages[0], messages
        assert ("wrong shapes" in messages[0]) == (damage == "wrong shapes")
        assert max_relative_gap(reference, cond) <= ENCODER_ULPS * EPS
    assert path.read_bytes() != bad
    calls = count_encoder_calls(family)
    cache(samples, rows, "train")
    assert calls == [] and len(messages) == 1


def test_every_single_byte_flip_of_an_entry_is_detected(tmp_path):
    """Each byte of a whole entry file (header and tensors) flipped in turn: not one damaged file decodes."""
    from nftcore.trainer.conditioning_cache import EntryProblem, check_layout, content_hash, decode_entry

    family = demo_family()
    sample = family.train_dataset[3]
    cache = disk_cache(family, tmp_path, [])
    cache([sample], [3], "train")
    path = entry_path(cache, sample)
    data = path.read_bytes()
    accepted = []
    for i in range(len(data)):
        try:
            cond = decode_entry(_flip(i)(data), path, cache.identity, content_hash(sample))
            check_layout(cond, cache.target_tokens)
            accepted.append(i)
        except EntryProblem:
            pass
    assert accepted == [] and len(data) > 1000


def test_cache_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data.cache_dir='/x' is used only by data.cache_conditioning='disk'"):
        load_config(["--data.cache_dir=/x", "--data.cache_conditioning=memory"])
    cfg = load_config(["--run.out=/o", "--data.cache_conditioning=disk"])
    assert directory_of(cfg) == Path("/o/conditioning_cache")


# ------------------------------------------------------------------------------------------------ real families


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    pytest.importorskip("diffusers")
    from nftcore.testing.tiny_pipelines import build_kontext_pipeline, build_qwen_edit_pipeline

    return {"flux": build_kontext_pipeline(tmp_path_factory.mktemp("kontext")),
            "qwen_image": build_qwen_edit_pipeline(tmp_path_factory.mktemp("qwen-edit"))}


PROMPTS = ["make the sky blue", "add a hat to the dog", "remove the cat from the sofa and keep everything else",
           "turn the photo into a watercolor painting"]


def edit_args(tmp_path, folder, family, **overrides) -> list[str]:
    """tests/test_trainer_edit_families.py's one-epoch set-up on 4 train rows + 1 eval row, disk cache on."""
    from tests.helpers.edit_runs import write_dataset

    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, PROMPTS)
    options = {
        "run.out": tmp_path / "out", "run.epochs": 1, "run.seed": 3, "model.family": family, "model.path": folder,
        "model.dtype": "fp32", "data.path": data, "sampling.resolution": 32, "sampling.group_size": 2,
        "sampling.groups_per_epoch": 2, "sampling.batch_size": 2, "sampling.num_steps": 2,
        "optim.steps_per_epoch": 1, "lora.rank": 2, "lora.alpha": 4.0, "filter.rule": "none", "eval.every": 0,
        "metrics.progress": False, "data.cache_conditioning": "disk", "data.cache_dir": tmp_path / "cache",
        **({"sampling.guidance_scale": 2.5} if family == "flux" else {}), **overrides}
    return [f"--{k}={v}" for k, v in options.items()]


def brightness(edited, sources, prompts, metadata):
    from nftcore.reward.base import RewardResult

    return RewardResult.from_scores(torch.as_tensor(edited).float().mean(dim=(1, 2, 3)))


def text_encoders(family) -> list:
    model = family.model
    return [model.clip, model.t5] if hasattr(model, "t5") else [model.text_encoder]


@pytest.mark.parametrize("name", ["flux", "qwen_image"])
def test_precompute_then_train_without_the_text_encoders(tmp_path, pipelines, name, capsys):
    """`python -m nftcore.precompute` fills the cache for both splits (4 + 1 rows; the eval row is train row 0, so
    it finds that row's entry: entries are keyed by content, not split); a disk-cache run then builds the
    family without its text encoders, gets the uncached encoders' conditioning from the entries, trains an epoch
    without encoding anything, and loads the encoders (whole, here) only when an entry turns out damaged."""
    from nftcore.precompute import main
    from nftcore.trainer.family import build_family

    args = edit_args(tmp_path, pipelines[name], name)
    assert main(args) == 0
    assert "5 rows, 4 encoded, 1 already valid" in capsys.readouterr().out
    assert main([*args, "--batch-size=3"]) == 0
    assert "5 rows, 0 encoded, 5 already valid; 0 B written" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 4

    trainer = Trainer(load_config(args), reward_fn=brightness, echo=False)
    assert "the text encoder(s) are not loaded" in capsys.readouterr().out
    assert text_encoders(trainer.family) == [None] * len(text_encoders(trainer.family))
    uncached = build_family(load_config(edit_args(tmp_path, pipelines[name], name,
                                                  **{"data.cache_conditioning": "off", "data.cache_dir": ""})),
                            torch.device("cpu"), load_transformer=False)
    assert all(m is not None for m in text_encoders(uncached))
    # Bitwise, against the uncached encoders run on the batches precompute ran: train rows [0, 1] and [2, 3] (the
    # eval row reuses row 0's entry). Other batches would differ by the encoders' batch-size rounding only.
    train = [uncached.train_dataset[i] for i in range(4)]
    reference = uncached.cat_conditioning([uncached.conditioning(train[:2]), uncached.conditioning(train[2:])])
    assert max_relative_gap(reference, trainer.conditioning(train, [0, 1, 2, 3], "train")) == 0
    eval_row = uncached.eval_dataset[0]
    assert max_relative_gap(uncached.index_conditioning(reference, torch.tensor([0])),
                            trainer.conditioning([eval_row], [0], "eval")) == 0

    trainer.train()
    (row,) = read_metrics(trainer.cfg.run.metrics_path)
    assert math.isfinite(row["loss"]) and trainer.conditioning.stats["encoder_calls"] == 0
    assert text_encoders(trainer.family) == [None] * len(text_encoders(trainer.family))

    messages = []
    trainer.conditioning.warn = messages.append
    sample = trainer.family.train_dataset[2]
    path = trainer.conditioning.path(entry_key(trainer.conditioning.identity, sample.sample_id, sample.prompt))
    path.write_bytes(path.read_bytes()[:100])
    cond = trainer.conditioning([sample], [2], "train")
    assert len(messages) == 1 and str(path) in messages[0]
    assert all(m is not None for m in text_encoders(trainer.family))  # loaded on demand
    assert max_relative_gap(uncached.conditioning([sample]), cond) == 0


def test_precompute_errors_are_one_line(tmp_path, capsys):
    from nftcore.precompute import main

    assert main(["--data.nope=1"]) == 2
    assert main(["--model.family=flux", f"--model.path={tmp_path / 'missing'}", f"--data.path={tmp_path}"]) == 1
    assert main(["--batch-size", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("nftcore.precompute: ") for line in err), err
    assert "--data.nope" in err[0] and "missing" in err[1] and "--batch-size" in err[2]


def test_sharded_encoders_stay_in_step_when_only_one_rank_misses(tmp_path, pipelines):
    """torchrun, 2 gloo ranks, FSDP2-sharded T5 + CLIP: precompute with the cache full except rank 0's two train
    rows. Rank 0 encodes them in two calls; rank 1 has no miss and must join each call's collectives with a padding
    encode (without it the ranks' all-gathers would pair up wrongly and hang or fail). The rewritten entries equal
    the one-process ones."""
    from tests.helpers.jobs import TORCHRUN, launch

    if not TORCHRUN.exists():
        pytest.skip("torchrun not in the venv")
    from nftcore.precompute import main

    args = edit_args(tmp_path, pipelines["flux"], "flux", **{"sampling.batch_size": 1})
    assert main(args) == 0
    cfg = load_config(args)
    family = build_edit_family(cfg)
    identity = identity_of(family)
    paths = [directory_of(cfg) / f"{entry_key(identity, s.sample_id, s.prompt)}{SUFFIX}"
             for s in (family.train_dataset[i] for i in (0, 1))]
    before = [p.read_bytes() for p in paths]
    for p in paths:
        p.unlink()
    result = launch(["-m", "nftcore.precompute", *args, "--parallel.shard_text_encoder=true"], nproc=2, timeout=180)
    assert "FSDP2-sharded over 2 ranks" in result.stdout
    assert "5 rows, 2 encoded, 3 already valid" in result.stdout, result.stdout
    from safetensors.torch import load

    for old, path in zip(before, paths):
        new = load(path.read_bytes())
        for key, value in load(old).items():
            assert torch.allclose(new[key].double(), value.double(), rtol=ENCODER_ULPS * EPS, atol=0), key


def build_edit_family(cfg):
    from nftcore.trainer.family import build_family

    return build_family(cfg, torch.device("cpu"), load_transformer=False)
