"""Ahead-of-time Triton compile for Hopper (sm_90) on a machine with no GPU.

Why: the interpreter (`TRITON_INTERPRET=1`, used by the CPU test suite) accepts kernels that the GPU compiler
rejects (a `tl.dot` with K < 16, for instance) and says nothing about shared memory, registers or which MMA
instructions a config turns into. `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the real
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with Triton's bundled ptxas) without a driver, so CI can check
every shipped kernel config for sm_90.

The compile runs in a subprocess (`python -m tests.helpers.aot`, specs as JSON on stdin, results as JSON on stdout)
because the test process has `TRITON_INTERPRET=1` set before any kernel module is imported, and a module imported under
the interpreter keeps interpreter-flavoured `@triton.jit` objects. The child sets `TRITON_INTERPRET=0` and imports the
kernel module fresh. One child compiles a whole list of specs (`compile_many`): starting Python + torch + triton costs
about 2 s, one config about 0.3-1 s. Nothing is cached here; Triton keeps its own cache in ~/.triton/cache, so
`compile_s` is only a compile time when that cache is cold (pass `env={"TRITON_CACHE_DIR": tmp}` to force it).

Typical use in a test::

    res = compile_sm90("nftcore.kernels.nft_loss", "_nft_loss_fwd_kernel",
                       {"X": "*bf16", "Y": "*fp32", "N": "i32"}, {"BLOCK": 1024}, num_warps=8)
    assert res.ok, res.error
    assert res.shared_bytes <= H100_SHARED_LIMIT

Written against triton 3.7.1; the ASTSource/GPUTarget calls are the same in 3.6 and 3.9, and the few spots that
differ between versions (ASTSource keywords, metadata as namedtuple or dict) are handled in `_compile_one`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: Largest dynamic shared memory one block may opt into on H100/H200 (227 KiB): cudaDevAttrMaxSharedMemoryPerBlockOptin.
H100_SHARED_LIMIT = 232448

_REPO_ROOT = Path(__file__).resolve().parents[2]
# A PTX instruction (optionally predicated, `@%p1 atom.global...`) that is an atomic RMW or a reduction. Anchored at
# the start of the line: a bare substring search for "red." also matches "shared.".
_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", re.MULTILINE)
_ERROR_CHARS = 4000  # CompilationError text carries the source excerpt; keep enough of it, not the whole PTX dump


@dataclass(frozen=True)
class AOTSpec:
    """One kernel config to compile.

    `signature` maps argument names to Triton types ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32", ...).
    Arguments named in `constexprs` may be left out of it (they get "constexpr"). Constexpr values must be JSON
    values; a string "tl.float16" (any `tl.<dtype>`) is turned into that Triton dtype in the child.

    `divisible_by_16` names the arguments the launch would specialize as multiples of 16. None means every pointer
    and integer argument: that is what a launch on torch tensors with multiple-of-16 sizes and strides gets, and
    it is the variant with the deepest software pipelining, i.e. the most shared memory. Without it, loads whose
    strides are unknown are not pipelined and shared memory is under-reported.
    """

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    arch: int = 90
    divisible_by_16: tuple[str, ...] | None = None
    label: str = ""


@dataclass
class AOTResult:
    """What one compile produced. Fields other than `ok`/`error` are None when the compile failed.

    `registers` and `stack_bytes` come from the cubin through Triton's bundled `cuobjdump` (None if it is missing);
    `stack_bytes > 0` means register spills.
    """

    label: str
    ok: bool
    error: str = ""
    shared_bytes: int | None = None
    uses_wgmma: bool | None = None
    has_atomics: bool | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    arch: int | None = None
    ptx_lines: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    compile_s: float | None = None
    triton_version: str = ""

    @property
    def fits_shared(self) -> bool:
        """True when the config's shared memory fits one H100/H200 block (False if the compile failed)."""
        return self.ok and self.shared_bytes is not None and self.shared_bytes <= H100_SHARED_LIMIT

    def summary(self) -> str:
        if not self.ok:  # a CompilationError's first line is "at L:C:", its last line says what went wrong
            lines = [ln for ln in self.error.splitlines() if ln.strip()] or [""]
            what = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else lines[0]
            return f"{self.label}: FAILED {what}"
        return (f"{self.label}: shared={self.shared_bytes} B wgmma={self.uses_wgmma} atomics={self.has_atomics} "
                f"regs={self.registers} stack={self.stack_bytes} warps={self.num_warps} stages={self.num_stages} "
                f"ptx_lines={self.ptx_lines} {self.compile_s:.2f} s")


def compile_sm90(module: str, kernel: str, signature: dict[str, str], constexprs: dict[str, Any] | None = None, *,
                 num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                 divisible_by_16: Sequence[str] | None = None, timeout: float = 180.0,
                 env: dict[str, str] | None = None) -> AOTResult:
    """Compile one kernel config for `arch` (default sm_90) in a fresh subprocess. See `AOTSpec` for the arguments."""
    spec = AOTSpec(module, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, arch,
                   None if divisible_by_16 is None else tuple(divisible_by_16))
    return compile_many([spec], timeout=timeout, env=env)[0]


def compile_many(specs: Sequence[AOTSpec], *, timeout: float | None = None,
                 env: dict[str, str] | None = None) -> list[AOTResult]:
    """Compile every spec in ONE subprocess and return one result per spec, in order.

    A failing config does not stop the others. If the child itself dies or times out, every spec gets ok=False with
    the child's stderr tail as the error. `timeout` defaults to 60 s + 30 s per spec.
    """
    specs = list(specs)
    if not specs:
        return []
    labels = [s.label or _default_label(s) for s in specs]
    payload = json.dumps([{**asdict(s), "label": lab} for s, lab in zip(specs, labels)])
    child_env = {**os.environ, **(env or {}), "TRITON_INTERPRET": "0"}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    timeout = 60.0 + 30.0 * len(specs) if timeout is None else timeout
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.helpers.aot"], input=payload, capture_output=True,
                              text=True, cwd=_REPO_ROOT, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"AOT subprocess timed out after {timeout:.0f} s"
        return [AOTResult(label=lab, ok=False, error=error) for lab in labels]
    try:
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        return [AOTResult(**row) for row in rows]
    except (IndexError, ValueError, TypeError):
        tail = (proc.stderr or proc.stdout or "")[-_ERROR_CHARS:]
        return [AOTResult(label=lab, ok=False, error=f"AOT subprocess failed (rc={proc.returncode}):\n{tail}")
                for lab in labels]


def _default_label(spec: AOTSpec) -> str:
    consts = ",".join(f"{k}={v}" for k, v in spec.constexprs.items())
    return f"{spec.kernel}[{consts}] w{spec.num_warps}s{spec.num_stages} sm{spec.arch}"


# ----------------------------------------------------------------------------------------------------------------
# Child side: runs with TRITON_INTERPRET=0 in `python -m tests.helpers.aot`.
# ----------------------------------------------------------------------------------------------------------------

def _compile_one(spec: dict) -> dict:
    import importlib
    import time

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    res = {"label": spec["label"], "ok": False, "triton_version": triton.__version__}
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # unwrap @triton.autotune / @heuristics
            fn = fn.fn
        constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                      for k, v in spec["constexprs"].items()}
        # The signature in argument order, constexprs filled in: ASTSource wants every argument to have a type.
        missing = [a for a in fn.arg_names if a not in spec["signature"] and a not in constexprs]
        if missing:
            raise TypeError(f"arguments without a type in signature or constexprs: {missing}")
        signature = {a: "constexpr" if a in constexprs else spec["signature"][a] for a in fn.arg_names}
        div = spec["divisible_by_16"]
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if signature[a] != "constexpr" and (a in div if div is not None else _is_ptr_or_int(signature[a]))}
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        except TypeError:  # older spelling: `constants=` (kept for safety; 3.6-3.9 all take `constexprs=`)
            src = ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=attrs)
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        res["compile_s"] = round(time.perf_counter() - t0, 3)
        meta = compiled.metadata
        get = meta.get if isinstance(meta, dict) else (lambda k, d=None: getattr(meta, k, d))
        ptx = compiled.asm.get("ptx", "")
        ttgir = compiled.asm.get("ttgir", "")
        res.update(ok=True, shared_bytes=int(get("shared", 0)), uses_wgmma="wgmma" in ptx,
                   has_atomics=bool(_PTX_ATOMIC.search(ptx)) or "tt.atomic_" in ttgir,
                   num_warps=int(get("num_warps", spec["num_warps"])),
                   num_stages=int(get("num_stages", spec["num_stages"])), arch=spec["arch"],
                   ptx_lines=ptx.count("\n"))
        res.update(_resource_usage(compiled.asm.get("cubin")))
    except Exception as exc:  # noqa: BLE001 - every compile failure is a result, not a crash
        res["error"] = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
    return res


def _is_ptr_or_int(ty: str) -> bool:
    return ty.startswith("*") or (ty[:1] in "iu" and ty != "i1")


def _resource_usage(cubin: bytes | None) -> dict:
    """Registers and stack (spill) bytes of the cubin, via Triton's bundled cuobjdump; {} when unavailable."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cubin or not tool.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))} if m else {}


def _child_main() -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    # Triton prints ptxas reproducers with print(); keep the real stdout for the one JSON line.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if str(_REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(_REPO_ROOT))
    results = [_compile_one(spec) for spec in json.loads(sys.stdin.read())]
    json_out.write(json.dumps(results) + "\n")
    json_out.flush()


if __name__ == "__main__":
    _child_main()
