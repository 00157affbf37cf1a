"""Backend choice for every fused op: Triton on CUDA, native C++ on CPU when built, the PyTorch reference otherwise.

The decision is made per call (environment read at call time, so tests and users can flip it without re-importing):

- ``NFTCORE_DISABLE_TRITON=1``  never use the Triton kernels;
- ``NFTCORE_FORCE_TRITON=1``    send CPU tensors through the Triton kernels too (needs ``TRITON_INTERPRET=1`` set before
  the kernels were imported) - this is how the kernels are tested without a GPU;
- ``NFTCORE_DISABLE_NATIVE=1``  never use the native CPU library.

An op without a kernel for some backend simply skips that backend. The reference is always present.

The native backend is the extension module `nftcore._C` (`csrc/`, built by setup.py; loader in `nftcore/_native.py`),
whose kernels are `torch.ops.nftcore_native.*`. It is loaded on the first CPU call of an op that has a native kernel;
if it is missing (not built, build failed or skipped with NFTCORE_SKIP_NATIVE=1, stale, built for another torch) that
first call warns once, naming the reason, and every call runs on the reference.

See docs/DESIGN.md §5 (point 3) and, for the native build, docs/DESIGN.md §6.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Mapping

import torch

DISABLE_TRITON = "NFTCORE_DISABLE_TRITON"
FORCE_TRITON = "NFTCORE_FORCE_TRITON"
DISABLE_NATIVE = "NFTCORE_DISABLE_NATIVE"

_FALSE_VALUES = ("", "0", "false", "no", "off")


class Backend(str, enum.Enum):
    TRITON = "triton"
    NATIVE = "native"
    REFERENCE = "reference"


# Every eager op call reads up to three flags (they may change at run time, e.g. in tests), and `os.environ.get`
# encodes the name and decodes the value each time: ~0.7 µs a flag, a fifth of a small fused op's Python cost. On
# POSIX the values live in `os.environ._data` (bytes to bytes, what os.environ reads and writes through), read here
# directly; elsewhere through os.environ.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_FALSE_BYTES = frozenset(v.encode() for v in _FALSE_VALUES)


@functools.cache
def _encoded(name: str) -> bytes:
    return os.fsencode(name)


def env_flag(name: str) -> bool:
    """True when the environment variable is set to anything but an explicit false ("", 0, false, no, off)."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(_encoded(name), b"").strip().lower() not in _FALSE_BYTES
    return os.environ.get(name, "").strip().lower() not in _FALSE_VALUES


@functools.cache
def triton_available() -> bool:
    """Whether `triton` imports here (CPU machines may have it for the interpreter; some platforms lack it)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # a broken install is the same as none for dispatch purposes
        return False
    return True


@functools.cache
def native_available() -> bool:
    """Whether the native CPU library (`nftcore._C`, built from `csrc/`) imports and matches this torch and tree.

    Loaded once per process, on the first call (made by the first CPU dispatch of an op with a native kernel, unless
    NFTCORE_DISABLE_NATIVE is set, which `select_backend` reads first, per call). When it is not usable this warns
    once, with the reason, and the ops run on their references."""
    from nftcore import _native

    status = _native.status()
    if not status.loaded:
        warnings.warn(
            f"nftcore: native CPU kernels unavailable - {status.reason}. CPU calls of the fused ops run on their "
            f"PyTorch references (same results, slower). Set {DISABLE_NATIVE}=1 to choose the references explicitly "
            "and silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
    return status.loaded


def interpreter_active() -> bool:
    return env_flag("TRITON_INTERPRET")


def select_backend(op: str, device: torch.device, available: Mapping[Backend, object]) -> Backend:
    """Pick the backend for one call of `op` on tensors living on `device`.

    `available` lists the backends this op implements (the reference must be among them).
    """
    if Backend.REFERENCE not in available:
        raise RuntimeError(f"{op}: every op needs a reference implementation")
    disable_triton, force_triton = env_flag(DISABLE_TRITON), env_flag(FORCE_TRITON)
    if disable_triton and force_triton:
        raise RuntimeError(f"{op}: both {DISABLE_TRITON} and {FORCE_TRITON} are set; unset one")
    if Backend.TRITON in available and not disable_triton:
        if device.type == "cuda" and triton_available():
            return Backend.TRITON
        if force_triton:
            if not triton_available():
                raise RuntimeError(f"{op}: {FORCE_TRITON}=1 but triton does not import here")
            if device.type == "cpu" and not interpreter_active():
                raise RuntimeError(
                    f"{op}: {FORCE_TRITON}=1 with CPU tensors needs TRITON_INTERPRET=1 set before nftcore's kernels "
                    "are imported"
                )
            return Backend.TRITON
    if (
        Backend.NATIVE in available
        and device.type == "cpu"
        and not env_flag(DISABLE_NATIVE)
        and native_available()
    ):
        return Backend.NATIVE
    return Backend.REFERENCE


_last_backend: dict[str, Backend] = {}


def last_backend(op: str) -> Backend | None:
    """The backend the most recent call of `op` ran on in this process (for tests and benchmarks)."""
    return _last_backend.get(op)


def record_fallback(op: str) -> None:
    """Called by a backend's implementation that hands these inputs to the reference (e.g. a dtype its kernels do
    not cover), so `last_backend` names what really ran."""
    _last_backend[op] = Backend.REFERENCE


def dispatch(op: str, device: torch.device, impls: Mapping[Backend, Callable[[], Callable]]) -> Callable:
    """Resolve `op` to an implementation. `impls` maps each backend to a zero-argument loader, so kernel modules
    are imported only when first used (keeps `import nftcore.ops` light and lets `TRITON_INTERPRET` be set first)."""
    backend = select_backend(op, device, impls)
    _last_backend[op] = backend
    return impls[backend]()


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_covers(x: torch.Tensor, args) -> bool:
    """What the element-wise native kernels take: x fp32/bf16/fp16 and non-empty, and no fp64 tensor among the
    arguments (the reference computes e.g. x + gate·y in fp64 for an fp64 gate: the kernels' fp32 would lower that
    precision)."""
    return (x.dtype in _NATIVE_DTYPES and x.numel() > 0
            and not any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args))


def native_impl(kernel_name: str, op: str, reference: Callable, x_index: int) -> Callable[[], Callable]:
    """Loader of `torch.ops.nftcore_native.<kernel_name>` for an op's NATIVE table entry, called with the impl's
    arguments; inputs it does not take (see `_native_covers`) go to `reference`, recorded as a fallback of `op`.
    `x_index`: the position of x (or grad) in the arguments."""

    def load():
        from nftcore._native import op as native_op

        kernel = native_op(kernel_name)

        def impl(*args):
            if not _native_covers(args[x_index], args):
                record_fallback(op)
                return reference(*args)
            return kernel(*args)

        return impl

    return load
