"""Jobs in child processes, as the multi-rank tests start them: `python` for one process, `torchrun` (gloo on CPU)
for several, one thread each, the repository importable; and `Gated`, a trainer job stopped at a known reward call.

Scripts the children run (`gated_job.py`, `judge_sharding_job.py`) live beside this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")


def job_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launcher(nproc: int, *, torchrun: bool | None = None) -> list[str]:
    """The command prefix: `python` for one process, else (or with `torchrun=True`) `torchrun --standalone`."""
    if not (nproc > 1 if torchrun is None else torchrun):
        return [sys.executable]
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"]


def launch(command: list[str], *, nproc: int = 1, timeout: int = 240, check: bool = True,
           torchrun: bool | None = None) -> subprocess.CompletedProcess:
    """Run `command` (`["-m", module, ...]` or `[script, ...]`) under `launcher(nproc)` from the repository root;
    with `check`, fail the test with the job's output unless it exits 0."""
    cmd = [*launcher(nproc, torchrun=torchrun), *command]
    result = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def run_job(args: list[str], *, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m nftcore.train ARGS` (or under torchrun), which must exit 0."""
    return launch(["-m", "nftcore.train", *args], nproc=nproc, timeout=timeout)


class Gated:
    """A job run through tests/helpers/gated_job.py: it stops at its reward call number `call` (per process) until
    released.

    `wait()` returns once every rank has arrived (their pids), or fails if the job ended first; `release()` lets them
    go on. Synchronised on those events only: the machine's speed changes nothing."""

    def __init__(self, tmp_path: Path, args: list[str], *, call: int, nproc: int = 1):
        self.gate, self.nproc = tmp_path / "gate", nproc
        self.gate.mkdir()
        script = [str(HELPERS / "gated_job.py"), str(self.gate), str(call), *args]
        self.proc = subprocess.Popen([*launcher(nproc), *script], cwd=ROOT, env=job_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait(self) -> list[int]:
        arrived = [self.gate / f"arrived-rank{r}" for r in range(self.nproc)]
        while not all(p.exists() for p in arrived):
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"the job ended (exit {self.proc.returncode}) before its gate:\n{out[-2000:]}\n"
                            f"{err[-4000:]}")
            time.sleep(0.02)  # polls for the event; how long it takes does not matter
        return [int(p.read_text()) for p in arrived]

    def release(self, ranks: list[int] | None = None) -> None:
        """Let `ranks` (default: all) go on; a killed rank must not be named (its FIFO would wait for a reader)."""
        for r in range(self.nproc) if ranks is None else ranks:
            with open(self.gate / f"release-rank{r}", "w"):
                pass

    def finish(self, timeout: int = 240) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, out, err
