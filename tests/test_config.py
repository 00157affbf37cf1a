"""Trainer configuration (nftcore.config): recipes, TOML and CLI loading, errors, round trips, batch arithmetic.

Nothing here needs torch; the names shared with nftcore.nft / nftcore.sampling / nftcore.ops are read from their
sources with `ast`, so the test stays fast and still fails when one side renames something.
"""

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest

from nftcore.config import (
    RECIPES,
    SECTIONS,
    ConfigError,
    TrainConfig,
    batch_plan,
    build_recipe,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    demo,
    format_help,
    kontext_edit_r1,
    load_config,
    qwen_image_edit_r1,
)
from nftcore.config.errors import UnsupportedConfigError

ROOT = Path(__file__).resolve().parents[1]


def _types(section):
    """Field name → type of one section's dataclass."""
    return {f.name: f.type for f in fields(SECTIONS[section])}


def _get(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


# ---------------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_build_validate_and_are_fresh(name):
    cfg = build_recipe(name)
    assert cfg.validate() is cfg and cfg.recipe == name
    cfg.optim.lr = 1.0  # a fresh object per call: editing one config never leaks into the next
    assert build_recipe(name).optim.lr != 1.0
    assert list(SECTIONS) == [f.name for f in fields(TrainConfig)][1:]


def test_default_config_is_the_demo():
    assert TrainConfig() == demo() == load_config([])
    cfg = demo()
    assert cfg.model.family == "demo" and cfg.model.path == "" and cfg.reward.backend == "demo"
    assert cfg.sampling.resolution <= 128 and cfg.sampling.group_size < 12 and cfg.optim.mixed_precision == "no"
    plan = batch_plan(cfg, 1)
    assert plan.optimizer_steps_per_epoch > 1 and plan.grad_accum_micro_batches >= 1 and plan.train_timesteps >= 1


# The official Edit-R1 configs' values, shared by both Edit-R1 recipes.
EDIT_R1_DEFAULTS = {
    "sampling.group_size": 12, "sampling.groups_per_epoch": 24, "sampling.batch_size": 3, "sampling.num_steps": 6,
    "sampling.solver": "dpm2", "sampling.resolution": 512,
    "nft.beta": 1.0, "nft.kl_weight": 1e-4, "nft.adv_clip_max": 5.0, "nft.negative_weight": 1.0,
    "nft.global_std": True, "nft.timestep_fraction": 0.99, "nft.decay_type": 1, "nft.ema_decay": 0.9,
    "lora.rank": 32, "lora.alpha": 64.0, "lora.init": "gaussian", "lora.include_mlp": False,
    "optim.lr": 3e-4, "optim.betas": (0.9, 0.999), "optim.weight_decay": 1e-4, "optim.eps": 1e-8,
    "optim.max_grad_norm": 1.0, "optim.steps_per_epoch": 1, "optim.mixed_precision": "bf16",
    "filter.rule": "paper", "filter.mean_threshold": 0.9, "filter.std_threshold": 0.05,
    "eval.every": 10, "eval.num_steps": 15, "eval.solver": "euler", "checkpoint.save_every": 30, "run.seed": 42,
    "model.gradient_checkpointing": True, "reward.model": "Qwen/Qwen2.5-VL-32B-Instruct",
}
PER_MODEL = {
    "kontext_edit_r1": {"model.family": "flux", "sampling.guidance_scale": 2.5, "filter.ban_prompts": False},
    "qwen_image_edit_r1": {"model.family": "qwen_image", "sampling.guidance_scale": None, "filter.ban_prompts": True},
}


@pytest.mark.parametrize("name", sorted(PER_MODEL))
def test_edit_r1_recipes_carry_the_algorithm_defaults(name):
    cfg = build_recipe(name)
    expected = {**EDIT_R1_DEFAULTS, **PER_MODEL[name]}
    assert {key: _get(cfg, key) for key in expected} == expected
    assert cfg.train_timesteps == 5  # int(6 × 0.99): 5 of the 6 sampler timesteps per sample
    assert cfg.model.path and cfg.data.path


def _source_tree(relative):
    return ast.parse((ROOT / relative).read_text())


def _constant(relative, name):
    """A module-level (or class-level) constant of an nftcore source file, read without importing it (no torch)."""
    for node in ast.walk(_source_tree(relative)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node.value
    raise AssertionError(f"{name} not found in {relative}")


def _keyword_args(relative, function):
    for node in ast.walk(_source_tree(relative)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return {arg.arg for arg in node.args.args + node.args.kwonlyargs}
    raise AssertionError(f"{function} not found in {relative}")


def test_names_match_the_algorithm_modules():
    literal = lambda section, key: get_args(_types(section)[key])  # noqa: E731
    assert literal("filter", "rule") == ast.literal_eval(_constant("nftcore/nft/filtering.py", "FILTER_RULES"))
    assert literal("nft", "singleton") == ast.literal_eval(_constant("nftcore/nft/advantages.py", "SINGLETON_POLICIES"))
    presets = _constant("nftcore/nft/old_policy.py", "PRESETS")
    assert set(literal("nft", "decay_type")) == {ast.literal_eval(key) for key in presets.keys}
    solvers = {ast.literal_eval(key) for key in _constant("nftcore/sampling/solvers.py", "SOLVERS").keys}
    assert set(literal("sampling", "solver")) == set(literal("eval", "solver")) == solvers
    nft_loss_args = _keyword_args("nftcore/ops/nft_loss.py", "nft_loss")
    assert {"beta", "kl_weight", "negative_weight", "loss_scale"} <= nft_loss_args
    assert {"rank", "alpha", "init", "include_mlp"} <= _keyword_args("nftcore/models/lora.py", "apply_lora")
    assert {"adv_clip_max", "global_std", "singleton"} <= _keyword_args(
        "nftcore/nft/advantages.py", "rewards_to_optimality")


def test_importing_the_config_does_not_import_torch():
    code = "import sys, nftcore.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------------------------------------- TOML and the CLI


def test_toml_file_starts_from_its_recipe_then_cli_overrides_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('recipe = "qwen_image_edit_r1"\n\n[nft]\nbeta = 0.5\nkl_weight = 0\n\n'
                    '[optim]\nbetas = [0.9, 0.99]\n\n[filter]\nrule = "code"\n')
    cfg = load_config(["--config", str(path), "--nft.beta=0.25", "--run.out", "runs/x"])
    expected = qwen_image_edit_r1()
    expected.nft.beta, expected.nft.kl_weight, expected.optim.betas = 0.25, 0.0, (0.9, 0.99)
    expected.filter.rule, expected.run.out = "code", "runs/x"
    assert cfg == expected

    assert cfg.run.metrics_path == Path("runs/x/metrics.jsonl")  # the layout scripts rely on
    assert cfg.run.checkpoint_dir == Path("runs/x/checkpoints")

    path.write_text("[sampling]\ngroup_size = 8\n")  # no recipe line: start from the default (demo)
    assert load_config([f"--config={path}"]).sampling.group_size == 8
    assert load_config([f"--config={path}"]).recipe == "demo"


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--run.epochs", "7"], "run.epochs", 7),
        (["--run.seed=-0"], "run.seed", 0),
        (["--optim.lr=1e-5"], "optim.lr", 1e-5),
        (["--filter.mean_threshold", "-0.5"], "filter.mean_threshold", -0.5),  # a negative number is a value
        (["--run.out=runs/a b"], "run.out", "runs/a b"),
        (["--metrics.wandb=true"], "metrics.wandb", True),
        (["--metrics.wandb=True"], "metrics.wandb", True),  # Python's spelling, as f"--{key}={value}" writes it
        (["--metrics.progress", "0"], "metrics.progress", False),
        (["--metrics.progress=off"], "metrics.progress", False),
        (["--metrics.wandb", "--run.seed=1"], "metrics.wandb", True),  # a bare bool flag means true
        (["--metrics.tensorboard"], "metrics.tensorboard", True),
        (["--filter.rule=none"], "filter.rule", "none"),
        (["--optim.mixed_precision", "bf16"], "optim.mixed_precision", "bf16"),
        (["--nft.decay_type=2"], "nft.decay_type", 2),
        (["--optim.betas=0.8,0.95"], "optim.betas", (0.8, 0.95)),
        (["--optim.betas", "(0.5, 0.9)"], "optim.betas", (0.5, 0.9)),
        (["--config", "kontext_edit_r1", "--sampling.guidance_scale", "3.5"], "sampling.guidance_scale", 3.5),
        (["--config", "kontext_edit_r1", "--sampling.guidance_scale=none"], "sampling.guidance_scale", None),
        (["--config", "kontext_edit_r1", "--sampling.guidance_scale=None"], "sampling.guidance_scale", None),
        (["--lora.alpha=8"], "lora.alpha", 8.0),  # an int is a float
        (["--checkpoint.keep-latest=3"], "checkpoint.keep_latest", 3),  # dashes read as underscores
        (["--resume", "latest"], "checkpoint.resume", "latest"),
        (["--resume=runs/x/checkpoints/step-30"], "checkpoint.resume", "runs/x/checkpoints/step-30"),
        (["--checkpoint.resume", "latest"], "checkpoint.resume", "latest"),
        (["--checkpoint.resume=latest", "--checkpoint.resume="], "checkpoint.resume", ""),  # an empty value
        (["--run.epochs=3", "--run.epochs=5"], "run.epochs", 5),  # later wins
    ],
)
def test_cli_overrides_parse_by_field_type(argv, key, expected):
    value = _get(load_config(argv), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--optm.lr=1"], ["unknown config section 'optm'", "did you mean 'optim'", "sections: run, model"]),
        (["--optim.l=1"], ["unknown key 'l' in section [optim]", "did you mean 'lr'", "lr, betas, weight_decay"]),
        (["--optim.learning-rate", "1"], ["unknown key 'learning_rate' in section [optim]"]),
        (["--optim.lr=abc"], ["optim.lr (FLOAT)", "'abc' is not a float"]),
        (["--run.epochs=2.5"], ["run.epochs (INT)", "'2.5'"]),
        (["--filter.rule=papr"], ["filter.rule", "one of paper, code, none", "did you mean 'paper'"]),
        (["--nft.decay_type=3"], ["nft.decay_type", "one of 0, 1, 2"]),
        (["--metrics.wandb=maybe"], ["metrics.wandb", "true/false/1/0"]),
        (["--optim.betas=0.9"], ["optim.betas (FLOAT,FLOAT)", "2 comma-separated values"]),
        (["--optim.betas=0.9,x"], ["optim.betas", "'x' is not a float"]),
        (["--config", "kontext_edit_r1", "--sampling.guidance_scale=off"], ["sampling.guidance_scale (FLOAT|none)"]),
        (["--seed", "3"], ["unknown option '--seed'", "did you mean '--run.seed'"]),
        (["--recipe=demo"], ["unknown option '--recipe=demo'"]),  # the recipe is --config's
        (["--optim.lr"], ["optim.lr needs a value (FLOAT)"]),
        (["--resume"], ["--resume needs a value (latest|PATH)"]),
        (["--config", "qwen"], ["neither a recipe nor a file", "did you mean 'qwen_image_edit_r1'", "demo"]),
        (["--config", "demo", "--config", "demo"], ["--config given twice"]),
        (["--config", "missing.toml"], ["config file not found: missing.toml"]),
        (["stray"], ["unexpected argument 'stray'"]),
    ],
)
def test_cli_mistakes_are_config_errors_that_name_them(argv, needles):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    "text, needles",
    [
        ('[optimizer]\nlr = 1.0\n', ["unknown config section 'optimizer'", "did you mean 'optim'", "sections: run"]),
        ('[optim]\nlearning_rate = 1.0\n', ["unknown key 'learning_rate'", "[optim]", "keys of [optim]: lr"]),
        ('[optim]\nlr = "fast"\n', ["optim.lr: 'fast' has the wrong type", "float"]),  # key, value, type wanted
        ('[sampling]\ngroup_size = 12.0\n', ["sampling.group_size: 12.0 has the wrong type", "int"]),
        ('[run]\nname = 3\n', ["run.name: 3 has the wrong type", "str"]),
        ('[metrics]\nwandb = "true"\n', ["metrics.wandb: 'true' has the wrong type", "bool"]),  # TOML is typed
        ('[filter]\nrule = "papr"\n', ["filter.rule", "did you mean 'paper'"]),
        ('[optim]\nbetas = [0.9]\n', ["optim.betas: (0.9,) has the wrong type", "expected 2"]),
        ('optim = 3\n', ["[optim] must be a table"]),
        ('recipe = "qwen_edit"\n', ["unknown recipe 'qwen_edit'", "did you mean 'qwen_image_edit_r1'"]),
        ('[optim\n', ["not valid TOML"]),
    ],
)
def test_toml_mistakes_are_config_errors(tmp_path, text, needles):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    for needle in needles + [str(path)] * ("recipe" not in text):
        assert needle in str(info.value)


def test_validation_lists_every_problem_at_once():
    argv = ["--nft.timestep_fraction=1.5", "--sampling.group_size=1", "--optim.lr=0", "--model.family=flux",
            "--optim.betas=0.9,1.0", "--sampling.resolution=100"]
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    for needle in ["nft.timestep_fraction must be in (0, 1]", "sampling.group_size (K) must be ≥ 2",
                   "optim.lr must be > 0", "model.path must name", "optim.betas", "multiple of 16"]:
        assert needle in message


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--sampling.num_steps=1", "--nft.timestep_fraction=0.5"], "trains 0 timesteps"),
        (["--config", "qwen_image_edit_r1", "--sampling.guidance_scale=2.5"], "must be none for qwen_image"),
        (["--optim.steps_per_epoch=65"], "optim.steps_per_epoch = 65 exceeds the 64 samples of an epoch"),
        (["--reward.backend=local"], "reward.model must name"),
        (["--config", "kontext_edit_r1", "--parallel.shard_reward_model=true"],
         "parallel.shard_reward_model shards the in-process judge: it needs reward.backend = 'local', got 'server'"),
        (["--reward.backend=local", "--reward.model=J", "--reward.min_pixels=5000", "--reward.max_pixels=3136"],
         "reward.min_pixels = 5000 exceeds reward.max_pixels = 3136"),
        (["--reward.max_pixels=-1"], "reward.max_pixels must be ≥ 0, got -1"),
    ],
)
def test_cross_field_constraints(argv, needle):
    with pytest.raises(ConfigError, match="invalid config") as info:
        load_config(argv)
    assert needle in str(info.value)


# Each range a field declares (its `must_be`) → a value on its edge, which passes, and one past it, which fails.
RANGE_EDGES = {"≥ 1": (1, 0), "≥ 0": (0, -1), "> 0": (1e-9, 0), "in (0, 1]": (1, 0), "in [0, 1)": (0, 1)}
BOUNDED = {f"{section}.{f.name}": f.metadata["must_be"]
           for section, cls in SECTIONS.items() for f in fields(cls) if f.metadata["must_be"]}


def test_ranges_cover_the_plain_bounds():
    assert set(BOUNDED.values()) <= set(RANGE_EDGES)
    assert {"run.epochs", "lora.rank", "optim.lr", "optim.betas", "nft.ema_decay", "reward.max_pixels"} <= set(BOUNDED)


@pytest.mark.parametrize("key", sorted(BOUNDED))
def test_every_range_holds_on_its_edge_and_fails_past_it(key):
    section, name = key.split(".")
    tp = _types(section)[name]
    cast = float if float in (tp, *get_args(tp)) else int
    for value, ok in zip(RANGE_EDGES[BOUNDED[key]], (True, False)):
        cfg = demo()
        old = getattr(getattr(cfg, section), name)
        setattr(getattr(cfg, section), name, tuple(cast(value) for _ in old) if isinstance(old, tuple) else cast(value))
        found = [p for p in cfg.problems() if p.startswith(f"{key} must be {BOUNDED[key]}, got ")]
        assert bool(found) is not ok, (key, value, cfg.problems())


@pytest.mark.parametrize("argv, needle", [
    (["--sampling.guidance_scale=2.5"], "model.family='demo' cannot honour sampling.guidance_scale=2.5"),
    (["--data.path=data/edit-r1-dataset"], "model.family='demo' cannot honour data.path='data/edit-r1-dataset'"),
])
def test_settings_the_trainer_cannot_honour_are_refused_by_validate(argv, needle):
    """Checks that used to wait for the trainer: refused with the config, on one line when alone (the job's last)."""
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert message.startswith("invalid config: ") and "\n" not in message and needle in message, message
    # The editing families take what the demo cannot.
    assert load_config(["--config", "kontext_edit_r1", "--sampling.guidance_scale=3.5"]).sampling.guidance_scale == 3.5


def test_options_for_what_does_not_exist_are_gone():
    """fp16 autocast (no GradScaler), instruction-keyed groups and true CFG in training rollouts are not options."""
    with pytest.raises(ConfigError, match="'fp16' is not one of no, bf16"):
        load_config(["--optim.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="unknown key 'group_key'"):
        load_config(["--data.group_key=sample_id"])
    for argv in (["--sampling.true_cfg_scale=4"], ["--config=kontext_edit_r1", "--sampling.true_cfg_scale=1"]):
        with pytest.raises(ConfigError, match="unknown key 'true_cfg_scale'"):
            load_config(argv)


def test_world_size_checks_are_unsupported_config_errors():
    cfg = load_config(["--parallel.shard_text_encoder=true"])
    assert cfg.validate(world_size=1) is cfg and cfg.check_world_size(1) is cfg  # one rank shards nothing
    for check in (lambda: cfg.validate(world_size=2), lambda: cfg.check_world_size(2)):
        with pytest.raises(UnsupportedConfigError, match="parallel.shard_text_encoder=true: the demo's text encoder"):
            check()
    assert issubclass(UnsupportedConfigError, ConfigError) and issubclass(UnsupportedConfigError, NotImplementedError)
    kontext = load_config(["--config", "kontext_edit_r1"])  # shards its text encoders by default
    assert kontext.parallel.shard_text_encoder and kontext.validate(world_size=8) is kontext
    both = load_config(["--parallel.shard_text_encoder=true", "--model.finetune=full",
                        "--parallel.shard_transformer=false"])
    with pytest.raises(UnsupportedConfigError) as info:
        both.validate(world_size=2)
    assert str(info.value).startswith("invalid config for 2 ranks:\n  - ") and str(info.value).count("\n  - ") == 2


def test_configs_edited_in_python_are_type_checked():
    cfg = demo()
    cfg.optim.lr, cfg.filter.rule, cfg.optim.betas, cfg.metrics.wandb = "3e-4", "papr", (0.9,), 1
    message = "\n".join(cfg.problems())
    for needle in ["optim.lr: '3e-4' has the wrong type", "filter.rule: 'papr' has the wrong type",
                   "optim.betas: (0.9,) has the wrong type", "metrics.wandb: 1 has the wrong type"]:
        assert needle in message
    with pytest.raises(AttributeError):  # slots: a misspelt attribute is an error, not a new field
        cfg.optim.learning_rate = 1.0


# --------------------------------------------------------------------------------------------------- round trips


def _odd_config():
    """Every field type off its default, floats that print long, and strings that need escaping."""
    cfg = load_config(["--config", "kontext_edit_r1", "--optim.betas=0.85,0.9990001", "--nft.decay_type=0",
                       "--optim.lr=3.0000000000000004e-4", "--filter.rule=code", "--metrics.wandb",
                       "--sampling.guidance_scale=none", "--resume", "latest"])
    cfg.run.name = 'quote " back\\slash ünï \t tab'
    cfg.filter.mean_threshold = 0.1 + 0.2
    return cfg.validate()


@pytest.mark.parametrize("make", [demo, kontext_edit_r1, qwen_image_edit_r1, _odd_config])
@pytest.mark.parametrize("comments", [True, False])
def test_toml_dump_loads_back_equal(tmp_path, make, comments):
    cfg = make()
    path = tmp_path / "dump.toml"
    path.write_text(config_to_toml(cfg, comments=comments), encoding="utf-8")
    assert load_config(["--config", str(path)]) == cfg


@pytest.mark.parametrize("make", [demo, qwen_image_edit_r1, _odd_config])
def test_dict_and_json_load_back_equal(make):
    cfg = make()
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["recipe"] == cfg.recipe and set(data) == {"recipe", *SECTIONS}
    assert config_from_dict(data) == cfg


def test_toml_values_take_the_field_types(tmp_path):
    """TOML is typed: an int where a float goes is widened, an array is a tuple, "none" unsets an optional field."""
    path = tmp_path / "run.toml"
    path.write_text('recipe = "kontext_edit_r1"\n[nft]\nkl_weight = 0\n[optim]\nbetas = [1, 0]\n'
                    '[sampling]\nguidance_scale = "none"\n[filter]\nrule = "code"\n')
    cfg = load_config(["--config", str(path), "--optim.betas=0.5,0.9"])
    assert type(cfg.nft.kl_weight) is float and cfg.optim.betas == (0.5, 0.9) and cfg.filter.rule == "code"
    assert cfg.sampling.guidance_scale is None and cfg.recipe == "kontext_edit_r1"
    assert config_from_dict({"optim": {"betas": [0, 0.5]}}).optim.betas == (0.0, 0.5)


def test_help_and_print_config(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        load_config(["--config", "qwen_image_edit_r1", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == format_help(qwen_image_edit_r1())
    flat = " ".join(out.split())  # tyro wraps the help texts to the terminal's width
    for section, cls in SECTIONS.items():
        assert f" {section} options" in out and cls.__doc__.split("\n")[0] in flat  # a group per section
        assert all(f"--{section}.{key} " in out for key in _types(section))
    assert "--nft.kl_weight FLOAT" in out and "Not the KL weight" in flat
    assert "--lora.rank INT LoRA rank r. Range: ≥ 1. (default: 32)" in flat  # the recipe's value (field default 16)
    assert "--optim.betas FLOAT,FLOAT" in out and "--sampling.guidance_scale FLOAT|none" in out
    assert "--metrics.wandb {true,false}" in out and "--nft.decay_type {0,1,2}" in out
    assert "--config RECIPE|FILE.toml" in out and "--recipe" not in out

    # The help shows the base config, with a --config file applied; overrides around --help are not parsed.
    with pytest.raises(SystemExit) as info:
        load_config(["--config", "demo", "--run.epochs=1", "--help", "--no.such=key"])
    assert info.value.code == 0 and capsys.readouterr().out == format_help(demo())

    with pytest.raises(SystemExit):
        load_config(["--config", "qwen_image_edit_r1", "--run.epochs=9", "--print-config"])
    path = tmp_path / "printed.toml"
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_config(["--config", str(path)]).run.epochs == 9


# --------------------------------------------------------------------------------------------------- batch plans

# (recipe, world size) → (per-rank samples, rollout batches/rank, micro-batch, accumulation, steps/epoch, T_train)
PLANS = {
    ("qwen_image_edit_r1", 48): (6, 2, 3, 2, 1, 5),  # the reference's 48-GPU run: 2 micro-batches × 5 timesteps
    ("qwen_image_edit_r1", 8): (36, 12, 3, 12, 1, 5),
    ("qwen_image_edit_r1", 2): (144, 48, 3, 48, 1, 5),
    ("qwen_image_edit_r1", 1): (288, 96, 3, 96, 1, 5),
    ("kontext_edit_r1", 24): (12, 4, 3, 4, 1, 5),  # the reference's 24-GPU run: 4 × 5
    ("demo", 1): (64, 4, 16, 1, 4, 5),  # K·G = 8 × 8 in batches of 16, one per step; int(6 × 0.99) = 5
}


@pytest.mark.parametrize("recipe, world_size", sorted(PLANS))
def test_batch_plan_matches_hand_arithmetic(recipe, world_size):
    plan = batch_plan(build_recipe(recipe), world_size)
    got = (plan.samples_per_rank, plan.rollout_batches_per_rank, plan.micro_batch_size,
           plan.grad_accum_micro_batches, plan.optimizer_steps_per_epoch, plan.train_timesteps)
    assert got == PLANS[recipe, world_size]
    assert plan.samples_per_epoch == plan.samples_per_rank * world_size
    assert plan.backward_passes_per_step == plan.grad_accum_micro_batches * plan.train_timesteps
    assert str(plan.samples_per_epoch) in plan.summary()


def test_batch_plan_prompts_per_rollout():
    assert batch_plan(qwen_image_edit_r1(), 48).prompts_per_rollout == 12  # the reference table's 12 and 6
    assert batch_plan(kontext_edit_r1(), 24).prompts_per_rollout == 6
    assert batch_plan(qwen_image_edit_r1(), 1).prompts_per_rollout == 0.25  # groups straddle rollout calls


@pytest.mark.parametrize("recipe", ["demo", "kontext_edit_r1", "qwen_image_edit_r1"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7, 48])
def test_batch_plans_adapt_to_any_world_size(recipe, world_size):
    """Every rank makes the same number of rollout calls of at most sampling.batch_size; the shares differ by at
    most one and cover the epoch's samples exactly once, in order; `owner` inverts the split."""
    cfg = build_recipe(recipe)
    plan = batch_plan(cfg, world_size)
    samples = cfg.sampling.group_size * cfg.sampling.groups_per_epoch
    assert [g for rank in range(world_size) for g in plan.rank_samples(rank)] == list(range(samples))
    assert max(plan.shares) - min(plan.shares) <= 1 and max(plan.shares) == plan.samples_per_rank
    for rank in range(world_size):
        calls = plan.rollout_batches(rank)
        assert len(calls) == plan.rollout_batches_per_rank
        assert all(len(call) <= min(plan.micro_batch_size, cfg.sampling.batch_size) for call in calls)
        assert all(plan.owner(g) == rank for g in plan.rank_samples(rank))
    assert str(samples) in plan.summary()


def test_batch_plan_pads_a_call_that_a_short_share_leaves_empty():
    cfg = build_recipe("demo")
    cfg.sampling.batch_size = 1
    plan = batch_plan(cfg, 3)  # 64 samples: 22 + 21 + 21, so 22 calls of one on every rank
    assert plan.shares == [22, 21, 21] and plan.rollout_batches_per_rank == 22
    assert [len(call) for call in plan.rollout_batches(2)] == [1] * 21 + [0]


def test_batch_plan_errors_say_what_would_work():
    with pytest.raises(ConfigError) as info:
        batch_plan(build_recipe("demo"), 65)
    message = str(info.value)
    for needle in ["65 rank(s)", "K·G = 8 × 8 = 64 samples", "runs on 1 to 64 ranks",
                   "raise sampling.groups_per_epoch to at least 9"]:
        assert needle in message
    cfg = qwen_image_edit_r1()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="world_size"):
            batch_plan(cfg, bad)


# ------------------------------------------------------------------------------------------- non-finite and files


def _float_keys() -> list[str]:
    """Every `section.key` whose type is (or holds) a float: all of them must reject inf and nan."""
    def has_float(tp) -> bool:
        return tp is float or any(has_float(arg) for arg in get_args(tp))

    return [f"{section}.{key}" for section in SECTIONS for key, tp in _types(section).items() if has_float(tp)]


def test_every_float_key_is_found():
    keys = _float_keys()
    assert {"optim.lr", "optim.betas", "nft.beta", "nft.adv_clip_max", "reward.timeout_s",
            "sampling.guidance_scale", "filter.mean_threshold"} <= set(keys)


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused_on_the_command_line(key, text):
    cfg = demo()
    value = _get(cfg, key)
    override = ",".join([text] * len(value)) if isinstance(value, tuple) else text
    with pytest.raises(ConfigError) as info:
        load_config([f"--{key}={override}"])
    message = str(info.value)
    assert key in message and "finite" in message and repr(text) in message, message


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_set_in_python_are_problems_naming_the_key(key, value):
    cfg = demo()
    section, name = key.split(".")
    old = getattr(getattr(cfg, section), name)
    setattr(getattr(cfg, section), name, tuple(value for _ in old) if isinstance(old, tuple) else value)
    problems = [p for p in cfg.problems() if p.startswith(key)]
    assert problems and "finite" in problems[0], cfg.problems()
    with pytest.raises(ConfigError, match="finite"):
        cfg.validate()


@pytest.mark.parametrize("text, needle", [
    ("lr = inf", "inf is not a finite float"), ("lr = nan", "nan is not a finite float"),
    ("lr = -inf", "-inf is not a finite float"), ('lr = "inf"', "'inf' has the wrong type"),  # a string is no float
])
def test_non_finite_floats_in_toml_are_refused(tmp_path, text, needle):
    path = tmp_path / "run.toml"
    path.write_text(f"[optim]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    assert str(info.value).startswith(f"{path}: optim.lr: {needle}"), str(info.value)


def test_large_finite_floats_still_pass():
    cfg = load_config(["--reward.timeout_s=1e300", "--optim.max_grad_norm=0"])
    assert cfg.reward.timeout_s == 1e300 and cfg.optim.max_grad_norm == 0.0


@pytest.mark.parametrize("data, needles", [
    (b'recipe = "demo"\n[run]\nname = "caf\xe9"\n', ["not valid UTF-8", "line 3, column 12", "byte offset 33"]),
    (bytes(range(256)) * 4, ["not valid UTF-8", "line 2, column 118", "byte offset 128"]),
    (b'[run]\nname = "ok"\n\n[optim\nlr = 1.0\n', [":4:", "not valid TOML", "line 4"]),
    (b'\x00\x01\x02binary', ["not valid TOML", "line 1"]),
])
def test_unreadable_toml_names_the_file_and_where(tmp_path, data, needles):
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    message = str(info.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, message


def test_a_folder_named_like_a_toml_file_is_a_config_error(tmp_path):
    folder = tmp_path / "run.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(["--config", str(folder)])
