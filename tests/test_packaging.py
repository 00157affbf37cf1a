"""`pip install .` (a real wheel, not only the editable install) ships the Triton sources as `nftcore.kernels` and
no top-level `kernels` package, which an unrelated PyPI distribution owns."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_to_nftcore_kernels(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                                                 "runs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("nftcore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nftcore/kernels/__init__.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["nftcore"]
