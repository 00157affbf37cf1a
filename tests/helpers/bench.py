"""Benchmark scripts as the tests check them: `python bench/<script> ARGS --json PATH` in a child process, its
results read back from the JSON the harness writes (`bench/harness.py:write_json`). A test never imports a bench
script (tests/test_layout.py): it checks what the script prints and records, as a user would run it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.jobs import ROOT, launch


@dataclass(frozen=True)
class BenchRow:
    """One recorded result: `p50` in milliseconds, `peak_mb` None where the row measured no memory."""

    case: str
    provider: str
    mode: str
    p50: float
    peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_bench(script: str, args: list[str], *, results: Path | None = None,
              timeout: int = 600) -> tuple[list[BenchRow], str]:
    """Run bench/`script` with `args` (with `--json results` when `results` is given); return the rows it wrote there
    (none without `results`) and its stdout. The script must exit 0."""
    extra = ["--json", str(results)] if results is not None else []
    proc = launch([str(ROOT / "bench" / script), *args, *extra], timeout=timeout)
    rows = [] if results is None else [BenchRow(r["case"], r["provider"], r["mode"], r["p50_ms"], r["peak_mb"],
                                                r["extra"]) for r in json.loads(Path(results).read_text())]
    return rows, proc.stdout
