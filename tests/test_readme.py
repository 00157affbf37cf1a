"""The README's embedding example runs exactly as written."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_embedding_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- embed-example:start -->\s*```python\n(.*?)```\s*<!-- embed-example:end -->", text, re.S)
    assert block, "README lost its embedding example"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(block.group(1), str(README), "exec"), {})
    assert stdout.getvalue().startswith("loss ")


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "scripts/dev.sh demo" in text and "scripts/dev.sh test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/dev.sh test" in ci


def test_readme_torchrun_command_is_a_valid_config_for_its_rank_count():
    """The real-model command in the README: its overrides parse, and the recipe's epoch splits over its ranks."""
    from nftcore.config import batch_plan, load_config

    text = README.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "torchrun --nproc_per_node=" in ln and "-m nftcore.train" in ln)
    ranks = int(re.search(r"--nproc_per_node=(\d+)", line).group(1))
    cfg = load_config(line.split("-m nftcore.train", 1)[1].split())
    assert cfg.model.family == "qwen_image" and cfg.reward.backend == "server"
    batch_plan(cfg, world_size=ranks)  # raises ConfigError if K·G does not split over the ranks
