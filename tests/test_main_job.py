"""The README's main-job command runs and says what it is doing."""

import subprocess
import sys


def test_main_job_runs_and_says_the_trainer_is_not_built_yet():
    result = subprocess.run([sys.executable, "-m", "nftcore.train", "--steps", "6", "12"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "trainer is not built yet" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("uniform", "flux", "qwen_image"))]
    assert len(rows) == 6
    uniform_12 = next(r for r in rows if r[0] == "uniform" and r[1] == "12")
    assert float(uniform_12[3]) < float(uniform_12[2]) / 3  # dpm2 well ahead of euler on the uniform grid
