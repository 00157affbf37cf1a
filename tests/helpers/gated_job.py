"""`python tests/gated_job.py GATE_DIR CALL [nftcore.train arguments]`: the trainer's command line, with a gate.

The demo reward's call number CALL (0-based, counted per process) first writes GATE_DIR/arrived-rank{R} (its pid),
then blocks until the test opens the FIFO GATE_DIR/release-rank{R} for writing. A test can so signal or kill a run at
a known point of a known epoch — synchronised on that event, never on how fast the machine is. Runs under torchrun
too (R is the process's RANK).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def install_gate(gate: Path, call: int) -> None:
    from nftcore.demo.family import DemoReward

    rank = int(os.environ.get("RANK", 0))
    release = gate / f"release-rank{rank}"
    os.mkfifo(release)
    score, calls = DemoReward.__call__, [0]

    def gated(self, *args, **kwargs):
        if calls[0] == call:
            arrived = gate / f"arrived-rank{rank}"
            arrived.with_suffix(".tmp").write_text(str(os.getpid()))
            arrived.with_suffix(".tmp").rename(arrived)  # appears whole
            with open(release):  # blocks until the test opens the FIFO for writing
                pass
        calls[0] += 1
        return score(self, *args, **kwargs)

    DemoReward.__call__ = gated


if __name__ == "__main__":
    gate_dir, gate_call, *argv = sys.argv[1:]
    install_gate(Path(gate_dir), int(gate_call))
    from nftcore.train import main

    sys.exit(main(argv))
