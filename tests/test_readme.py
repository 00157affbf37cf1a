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
