"""`python -m nftcore.info`: what this installation will run, for bug reports.

Prints the versions (nftcore, Python, torch, triton), the CPU (model, cores, torch threads, ATen's CPU capability) and
GPU, the native CPU kernels (built or not and why; compiler, flags and instruction set they were compiled for; the
ops they register), the backend-selection environment variables, and for every public op of `nftcore.ops` the backend
its forward and backward will use here for CPU tensors and for CUDA tensors. `--json` prints the same as JSON.

The ops are found without a registry: every public function of `nftcore.ops` whose module holds a Backend-keyed
implementation table (`*FORWARD_IMPLS` / `*BACKWARD_IMPLS`, the dicts handed to `dispatch`); a module with several
ops names its tables after them (`ADALN_FORWARD_IMPLS` for `adaln`). Backends are picked with the dispatcher's own
`select_backend`, for float32 inputs (fp64 always runs the reference).

How each op picks its backend: docs/DESIGN.md §5 (point 3).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

import nftcore
from nftcore import _native
from nftcore.ops import dispatch

ENV_FLAGS = (dispatch.DISABLE_TRITON, dispatch.FORCE_TRITON, dispatch.DISABLE_NATIVE, "TRITON_INTERPRET",
             "NFTCORE_SKIP_NATIVE", "NFTCORE_NATIVE_GEMM", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str:
    if not dispatch.triton_available():
        return "not installed (or does not import)"
    import triton

    return triton.__version__


def _impl_tables(fn) -> tuple[dict | None, dict | None]:
    """The (forward, backward) Backend-keyed tables of public op `fn`, found in its module (see the docstring)."""
    module = sys.modules.get(fn.__module__)
    if module is None:
        return None, None
    tables = {name: value for name, value in vars(module).items()
              if isinstance(value, dict) and value and all(isinstance(k, dispatch.Backend) for k in value)
              and dispatch.Backend.REFERENCE in value}

    def pick(kind: str) -> dict | None:
        named = {name: t for name, t in tables.items() if kind in name}
        if len(named) == 1:
            return next(iter(named.values()))
        prefix = f"{fn.__name__.upper()}_{kind}"
        exact = [t for name, t in named.items() if name.lstrip("_").startswith(prefix)]
        return exact[0] if len(exact) == 1 else None

    return pick("FORWARD"), pick("BACKWARD")


def _backend_on(op: str, device: str, table: dict | None) -> str:
    if table is None:
        return "?"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the native status is reported in its own section
            backend = dispatch.select_backend(op, torch.device(device), table).value
    except RuntimeError as exc:  # e.g. NFTCORE_FORCE_TRITON without TRITON_INTERPRET
        return f"error: {exc}"
    return backend


def public_ops() -> list[dict]:
    """One entry per public op: its name, the backends it implements and the ones it will use on CPU and CUDA."""
    ops_pkg = importlib.import_module("nftcore.ops")
    rows = []
    for name in sorted(getattr(ops_pkg, "__all__", [])):
        fn = getattr(ops_pkg, name, None)
        if not inspect.isfunction(fn) or not fn.__module__.startswith("nftcore.ops."):
            continue
        fwd, bwd = _impl_tables(fn)
        if fwd is None:  # a helper (last_backend, select_backend), not an op
            continue
        rows.append({
            "op": name,
            "implements": sorted(b.value for b in fwd),
            "cpu": _backend_on(name, "cpu", fwd),
            "cuda": _backend_on(name, "cuda", fwd),
            "backward_cpu": _backend_on(name, "cpu", bwd),
            "backward_cuda": _backend_on(name, "cuda", bwd),
        })
    return rows


def collect() -> dict:
    st = _native.status()
    native = {"loaded": st.loaded, "reason": st.reason, **{f"build_{k}": v for k, v in st.build_info.items()}}
    if st.build_record:
        native["build_record"] = {k: st.build_record.get(k) for k in ("status", "seconds", "reason", "log")}
    if st.loaded:
        native["ops"] = [f"{_native.NAMESPACE}::{name}" for name in _native.registered_ops()]
        native["score_logits_gemm"] = _native.gemm()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "nftcore": nftcore.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _triton_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": cuda,
        "native": native,
        "environment": {flag: os.environ[flag] for flag in ENV_FLAGS if flag in os.environ},
        "ops": public_ops(),
    }


def render(info: dict) -> str:
    n = info["native"]
    lines = [
        f"nftcore {info['nftcore']}",
        f"python   {info['python']}",
        f"platform {info['platform']}",
        f"torch    {info['torch']} (CUDA {info['torch_cuda']})",
        f"triton   {info['triton']}",
        f"cpu      {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads, ATen CPU "
        f"capability {info['aten_cpu_capability']}",
        f"gpu      {info['gpu']}",
        "",
        "native CPU kernels (nftcore._C, csrc/):",
    ]
    if n["loaded"]:
        lines += [
            "  status   loaded",
            f"  compiler {n.get('build_compiler')}",
            f"  flags    {n.get('build_flags')}",
            f"  isa      {n.get('build_isa')}",
            f"  built against torch {n.get('build_torch_version')}, pybind11 {n.get('build_pybind11_version')}, "
            f"cmake {n.get('build_cmake')}",
            f"  ops      {', '.join(n.get('ops', []))}",
            f"  score_logits full-mode GEMM: {n.get('score_logits_gemm')}",
        ]
    else:
        lines.append(f"  status   NOT available: {n['reason']}")
        if "build_compiler" in n:
            lines.append(f"  (module built with {n['build_compiler']} [{n.get('build_flags')}] for "
                         f"{n.get('build_isa')}, torch {n.get('build_torch_version')})")
    record = n.get("build_record")
    if record:
        lines.append(f"  last build: {record.get('status')} ({record.get('seconds')} s); log {record.get('log')}")
    lines += ["", "environment: " + (", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "(no flags set)"),
              "", "ops: the backend of forward / backward for fp32 inputs (fp64 always runs the reference)"
              + ("" if info["gpu"] != "none" else "; no CUDA device here: the cuda column is what CUDA tensors "
                 "would get")]
    table = [("op", "implements", "cpu", "cuda")] + [
        (row["op"], ", ".join(row["implements"]), f"{row['cpu']} / {row['backward_cpu']}",
         f"{row['cuda']} / {row['backward_cuda']}") for row in info["ops"]]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nftcore.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
