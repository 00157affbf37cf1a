"""`torchrun --nproc_per_node=2 -m nftcore.edit` (gloo) writes exactly the files of the one-process run: batches are
dealt to ranks whole and each item's noise comes from its own key, so the two runs compute the same thing."""

from __future__ import annotations

import json
import subprocess

import pytest

from nftcore.testing.tiny_pipelines import build_kontext_pipeline
from tests.helpers.edit_runs import TINY, write_split
from tests.helpers.jobs import TORCHRUN, launch

pytest.importorskip("diffusers")



def run_edit(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    return launch(["-m", "nftcore.edit", *args], nproc=nproc)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_two_ranks_write_the_one_rank_files_bit_for_bit(tmp_path):
    folder = build_kontext_pipeline(tmp_path / "kontext")
    split = write_split(tmp_path / "data", n=5)
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"out{nproc}"
        run_edit(["--model", str(folder), "--jsonl", str(split), "--out", str(outs[nproc]), "--batch-size", "2",
                  "--no-auto-resize", *TINY], nproc)
    rows = {n: [json.loads(line) for line in (outs[n] / "manifest.jsonl").read_text().splitlines()] for n in outs}
    assert [r["key"] for r in rows[1]] == [r["key"] for r in rows[2]] and len(rows[1]) == 5
    assert {r["rank"] for r in rows[2]} == {0, 1} and not list(outs[2].glob("manifest.rank*.jsonl"))
    for row in rows[1]:
        assert row["status"] == "ok"
        assert (outs[1] / row["output"]).read_bytes() == (outs[2] / row["output"]).read_bytes(), row["key"]
