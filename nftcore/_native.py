"""Loader of nftcore's native CPU kernels, the extension module `nftcore._C` built from `csrc/` (see csrc/README.md).

`status()` tries the import once per process and says whether the kernels are usable, and if not, why: the module
was not built (the reason setup.py recorded in `_native_build.json`: skipped with NFTCORE_SKIP_NATIVE=1, or the
failed step and its log), it does not import, it was built against another torch, or `csrc/` changed since it was
built (an editable install whose sources moved on: rebuild). Importing the module registers its kernels as
`torch.ops.nftcore_native.*`; `op(name)` returns one. The dispatcher (`nftcore.ops.dispatch.native_available`) is
the only caller on the hot path; `python -m nftcore.info` prints the whole status.

    python -m nftcore._native     # one line: built / skipped / failed and why (scripts/dev.sh prints it)

See docs/DESIGN.md §6.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

NAMESPACE = "nftcore_native"
MODULE = "nftcore._C"
PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_RECORD = PACKAGE_DIR / "_native_build.json"  # written by setup.py's build_ext
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout, in an editable install (csrc/ and CMakeLists.txt live there)
REBUILD_HINT = "rebuild: scripts/dev.sh, or `pip install --no-build-isolation -e .`"


@dataclass(frozen=True)
class NativeStatus:
    """Whether `nftcore._C` is loaded; `reason` says why not ("" when it is)."""

    loaded: bool
    reason: str = ""
    build_info: dict = field(default_factory=dict)  # compiler, flags, isa, torch_version, ... (from the module)
    build_record: dict = field(default_factory=dict)  # what setup.py recorded (status, seconds, log, ...)


def read_build_record() -> dict:
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return {}


def sources_hash(root: Path = SOURCE_ROOT) -> str | None:
    """The digest CMakeLists.txt compiles into the module (sha256 over sorted "name:sha256(file)" lines of
    csrc/*.cpp, csrc/*.h and CMakeLists.txt), recomputed from the tree; None where the tree is not there (a wheel)."""
    csrc, cmake = root / "csrc", root / "CMakeLists.txt"
    if not (csrc.is_dir() and cmake.is_file()):
        return None
    files = sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.h")) + [cmake]
    items = sorted(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _torch_release(version: str) -> str:
    return version.split("+")[0]


@functools.cache
def status() -> NativeStatus:
    """`check()` once per process: what the dispatcher and `nftcore.info` see."""
    return check()


def check() -> NativeStatus:
    """Import `nftcore._C` (a no-op after the first time) and check it against this torch and tree; never raises."""
    record = read_build_record()
    try:
        module = importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != MODULE:
            return NativeStatus(False, f"importing {MODULE} failed: {exc}", build_record=record)
        if record.get("status") == "skipped":
            reason = f"not built: skipped ({record.get('reason')})"
        elif record.get("status") == "failed":
            reason = f"not built: the build failed ({record.get('reason', '?').splitlines()[0]})"
        else:
            reason = f"not built ({MODULE} is missing; {REBUILD_HINT})"
        return NativeStatus(False, reason, build_record=record)
    except Exception as exc:  # noqa: BLE001 - an ImportError (undefined symbol...) or a registration error
        return NativeStatus(False, f"{MODULE} does not load ({type(exc).__name__}: {exc}); {REBUILD_HINT}",
                            build_record=record)
    info = dict(module.build_info())
    built_for, running = info.get("torch_version", "?"), _torch_release(torch.__version__)
    if built_for != running:
        return NativeStatus(False, f"{MODULE} was built against torch {built_for}, this is torch {running}; "
                                   f"{REBUILD_HINT}", info, record)
    current = sources_hash()
    if current is not None and current != info.get("sources_hash"):
        return NativeStatus(False, f"{MODULE} is stale: csrc/ or CMakeLists.txt changed since it was built; "
                                   f"{REBUILD_HINT}", info, record)
    return NativeStatus(True, "", info, record)


def op(name: str):
    """`torch.ops.nftcore_native.<name>` (the module must be loaded: `status().loaded`)."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def registered_ops() -> list[str]:
    """Names of the ops the loaded module registered (empty when it is not loaded)."""
    if not status().loaded:
        return []
    prefix = NAMESPACE + "::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def gemm() -> str | None:
    """The GEMM score_logits' full mode uses for its vocabulary chunks, or None without the module."""
    return importlib.import_module(MODULE).score_logits_gemm() if status().loaded else None


def summary() -> str:
    """One line for humans: built (with what) / skipped / failed, and whether it loads here."""
    st = status()
    record = st.build_record
    if st.loaded:
        info = st.build_info
        took = f" in {record['seconds']} s" if "seconds" in record else ""
        return (f"nftcore native kernels: built{took} with {info.get('compiler')} [{info.get('flags')}] for "
                f"{info.get('isa')}, torch {info.get('torch_version')}; loaded")
    return f"nftcore native kernels: NOT available ({st.reason}); CPU ops run on their PyTorch references"


if __name__ == "__main__":
    print(summary())
