"""Benchmark of the NFT loss, forward + backward: `nftcore.ops.nft_loss` against the way the official code computes it.

Why this baseline: DiffusionNFT / Edit-R1 compute the loss in eager PyTorch with the adaptive weight taken in float64
(`x0_pred.double() - x0.double()`), which promotes the squared error to float64 too, and with one temporary per
step. `eager_fp64_style` below mirrors that, so the speedup column answers "what does the fused op buy over the
code people run today". `reference` is the tests' oracle (`nft_loss_reference`, fp32 autograd), for scale.
`nftcore` is the public op with whatever backend dispatch picks (the backend is part of the provider name: on CPU the
native C++ kernels when `nftcore._C` is built); `nftcore-reference` is the same public op with Triton and the native
kernels disabled, i.e. the PyTorch reference backend, measured interleaved with it so the ratio of the two rows is
what the native (or Triton) backend buys.

Every case first checks each provider's loss and gradient against an fp64 evaluation of the reference, so a fast
wrong result cannot pass as a speedup; the relative errors go into the CSV's `extra`.

    python bench/bench_nft_loss.py                   # qwen_image_edit_512 and demo on CPU, every shape on CUDA
    python -m bench.bench_nft_loss --shape all --dtype bf16 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_nft_loss.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import nftcore.ops  # noqa: E402
from bench import harness  # noqa: E402
from bench.shapes import NFT_LOSS_SHAPES, NFTLossShape, pick  # noqa: E402
from nftcore.ops.reference import nft_loss_reference  # noqa: E402

BENCH = "nft_loss"
BASELINE = "eager-fp64"
KL_WEIGHT = 1e-4  # Edit-R1 / paper-R1 Table 5 "KL Loss Weight"
LOSS_SCALE = 5.0  # A_max = adv_clip_max
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Allowed relative error vs fp64 before a provider is flagged (bf16 inputs carry 8 mantissa bits; eager-fp64 also
# does its branch arithmetic in the input dtype, as the official code does).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# `nftcore-op`: the custom op `torch.ops.nftcore.nft_loss` called directly, i.e. the fused kernels without the public
# function's input checks and its one value-check host sync (what the trainer's check_values=False call costs, less
# the checks); its `kernels` count is the fused path's own (2 forward launches, 1 multiply in backward, plus
# autograd's fill of grad_loss). CUDA, and CPU when the native kernels are built. `device-copy` (CUDA only):
# `torch.empty_like(x).copy_(x)` moving the case's byte count, the bandwidth the fused op is measured against.
FUSED_OP = "nftcore-op"
COPY = "device-copy"
CUDA_ONLY = (FUSED_OP, COPY)
# The public op on its PyTorch reference backend (Triton and native disabled for the provider's whole step).
OP_REFERENCE = "nftcore-reference"
REFERENCE_ENV = {"NFTCORE_DISABLE_TRITON": "1", "NFTCORE_DISABLE_NATIVE": "1"}


def _native_loaded() -> bool:
    from nftcore import _native

    return _native.status().loaded


def _demo_shape() -> NFTLossShape:
    """The embedded demo's training micro-batch: sampling.batch_size samples of its pixel-patch latents
    (image_size/patch)² tokens × 3·patch² channels - [16, 16, 48] today, read from the config, not hard-coded."""
    from nftcore.config import demo
    from nftcore.demo.model import DemoConfig

    cfg = DemoConfig()
    return NFTLossShape("demo", B=demo().sampling.batch_size, N=cfg.tokens, C=3 * cfg.patch**2,
                        note="the embedded CPU demo's micro-batch (launch/overhead-bound)")


SHAPES = {**NFT_LOSS_SHAPES, "demo": _demo_shape()}


@contextlib.contextmanager
def _environment(provider: str):
    """`nftcore-reference` runs with REFERENCE_ENV set (forward and backward: dispatch reads it per call)."""
    if provider != OP_REFERENCE:
        yield
        return
    with harness.env_vars(REFERENCE_ENV):
        yield


def _in_env(provider: str, fn):
    def run():
        with _environment(provider):
            return fn()

    return run


def eager_fp64_style(v_theta, v_old, x_t, x0, t, r, *, beta=1.0, loss_scale=LOSS_SCALE, v_ref=None, kl_weight=0.0,
                     negative_weight=1.0, mask=None):
    """The official DiffusionNFT / Edit-R1 loss, written the way their training scripts write it (no mask support:
    they apply it outside). Returns (loss, old_deviate, x0_norm): the diagnostics they log, so the work matches the
    fused op's outputs."""
    dims = tuple(range(1, x0.ndim))
    t_exp = t.view(-1, *[1] * (x0.ndim - 1))
    positive_prediction = beta * v_theta + (1.0 - beta) * v_old.detach()
    implicit_negative_prediction = (1.0 + beta) * v_old.detach() - beta * v_theta

    x0_prediction = x_t - t_exp * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.mean(torch.abs(x0_prediction.double() - x0.double()), dim=dims, keepdim=True).clip(min=1e-5)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)

    negative_x0_prediction = x_t - t_exp * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.mean(torch.abs(negative_x0_prediction.double() - x0.double()), dim=dims, keepdim=True).clip(min=1e-5)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)

    ori_policy_loss = r * positive_loss / beta + negative_weight * (1.0 - r) * negative_loss / beta
    loss = (ori_policy_loss * loss_scale).mean()
    if v_ref is not None and kl_weight > 0:
        kl_div_loss = ((v_theta - v_ref) ** 2).mean(dim=dims)
        loss = loss + kl_weight * torch.mean(kl_div_loss)
    with torch.no_grad():
        old_deviate = ((v_theta - v_old) ** 2).mean(dim=dims).mean()
        x0_norm = ((x_t - t_exp * v_theta) ** 2).mean(dim=dims).mean()
    return loss, old_deviate, x0_norm


def _loss_of(provider: str):
    """provider name -> callable(**inputs) -> scalar loss tensor."""
    if provider == BASELINE:
        return lambda **kw: eager_fp64_style(**kw)[0]
    if provider == "reference":
        return lambda **kw: nft_loss_reference(**kw).loss
    if provider == FUSED_OP:
        return _fused_op_loss
    return lambda **kw: nftcore.ops.nft_loss(**kw).loss


_ONES: dict = {}


def _fused_op_loss(v_theta, v_old, x_t, x0, t, r, *, beta=1.0, loss_scale=LOSS_SCALE, v_ref=None, kl_weight=0.0,
                   negative_weight=1.0):
    key = (t.shape, t.device)
    if key not in _ONES:
        _ONES[key] = torch.ones_like(t)  # built once, as a trainer would
    mask = _ONES[key]
    v_ref = v_ref if kl_weight != 0.0 else None
    want_grad = torch.is_grad_enabled() and v_theta.requires_grad
    return torch.ops.nftcore.nft_loss(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight,
                                      negative_weight, want_grad)[0]


def make_inputs(shape: NFTLossShape, dtype: torch.dtype, device: torch.device, with_ref: bool, seed: int = 0) -> dict:
    """Inputs shaped like one NFT step: x_t on the flow path, velocities near the flow target eps - x0."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g)

    B, N, C = shape.B, shape.N, shape.C
    x0, eps = randn(B, N, C), randn(B, N, C)
    t = 0.02 + 0.98 * torch.rand(B, generator=g)  # σ in [0.02, 1], the sampler's grid range
    x_t = (1 - t.view(B, 1, 1)) * x0 + t.view(B, 1, 1) * eps
    v_old = eps - x0 + 0.1 * randn(B, N, C)
    out = dict(v_theta=v_old + 0.01 * randn(B, N, C), v_old=v_old, x_t=x_t, x0=x0, t=t, r=torch.rand(B, generator=g))
    if with_ref:
        out["v_ref"] = v_old + 0.01 * randn(B, N, C)
    out = {k: v.to(device=device, dtype=dtype if v.dim() == 3 else torch.float32) for k, v in out.items()}
    out["v_theta"].requires_grad_(True)
    return out


def _errors_vs_fp64(loss_fn, inputs: dict, kw: dict, provider: str = "") -> tuple[float, float]:
    """(relative loss error, max grad error / max |grad|) of one fwd+bwd, against nft_loss_reference in fp64."""
    ref_in = {k: v.detach().double().requires_grad_(k == "v_theta") for k, v in inputs.items()}
    ref_loss = nft_loss_reference(**ref_in, **kw).loss
    ref_loss.backward()
    inputs["v_theta"].grad = None
    with _environment(provider):
        loss = loss_fn(**inputs, **kw)
        loss.backward()
    grad, ref_grad = inputs["v_theta"].grad.double(), ref_in["v_theta"].grad
    inputs["v_theta"].grad = None
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
    grad_err = ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30)).item()
    return loss_err, grad_err


def bench_case(shape: NFTLossShape, dtype: torch.dtype, with_ref: bool, mode: str, providers: list[str],
               device: torch.device, args) -> list[harness.Result]:
    inputs = make_inputs(shape, dtype, device, with_ref)
    kw = dict(beta=1.0, loss_scale=LOSS_SCALE, kl_weight=KL_WEIGHT if with_ref else 0.0)
    case = f"{shape.name}{'+kl' if with_ref else ''}"
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    n_big = 4 + with_ref  # [B, N, C] inputs read by the forward
    # Bytes a fused op must move at least: fwd reads the big inputs; bwd reads them again and writes dv.
    nbytes = (n_big if mode == "fwd" else 2 * n_big + 1) * shape.numel * inputs["x0"].element_size()
    grads = [inputs["v_theta"]]
    steps, extras = {}, {}
    for provider in providers:
        if provider in CUDA_ONLY and device.type != "cuda" and not (provider == FUSED_OP and _native_loaded()):
            continue  # on CPU without the native kernels the fused op is the reference: nothing to add
        if provider == COPY:
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)  # read nbytes/2 + write nbytes/2
            steps[COPY] = lambda x=src: torch.empty_like(x).copy_(x)
            extras[COPY] = {"B": shape.B, "N": shape.N, "C": shape.C, "bytes": nbytes}
            continue
        loss_fn = _loss_of(provider)
        loss_err, grad_err = _errors_vs_fp64(loss_fn, inputs, kw, provider)
        name = provider
        if provider in ("nftcore", OP_REFERENCE):
            backend = nftcore.ops.last_backend("nft_loss")
            name = f"nftcore:{backend.value if backend is not None else '?'}"
            if name in steps:  # e.g. no native build: both providers ran the reference
                name = f"{provider}:{backend.value}"
        if max(loss_err, grad_err) > TOLERANCE[dtype]:
            print(f"WARNING {case} {dname} {name}: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e} vs fp64")
        if mode == "fwd":
            steps[name] = _in_env(provider, lambda f=loss_fn: f(**inputs, **kw))
        else:
            steps[name] = _in_env(provider, lambda f=loss_fn: f(**inputs, **kw).backward())
        extras[name] = {"B": shape.B, "N": shape.N, "C": shape.C, "kl_weight": kw["kl_weight"], "bytes": nbytes,
                        "loss_rel_err": float(f"{loss_err:.3e}"), "grad_rel_err": float(f"{grad_err:.3e}")}
        if device.type == "cuda" and (provider == FUSED_OP or name == "nftcore:triton"):
            cfg = _fused_config(shape)
            extras[name]["config"] = f"block={cfg.block},warps={cfg.num_warps},splits={cfg.splits}"

    timings = harness.time_many(steps, device, grad_to_none=grads, warmup=args.warmup, repeats=args.repeats)
    results = []
    for name, step in steps.items():
        extra = extras[name]
        bw = harness.gbps(nbytes, timings[name].p50)
        if bw is not None:
            extra["gbps"] = float(f"{bw:.3g}")
            if name != COPY and mode != "fwd":  # the ideal one-pass traffic: inputs read once, dv written once
                extra["gbps_one_pass"] = float(f"{bw * (n_big + 1) / (2 * n_big + 1):.3g}")
        kernels = harness.count_cuda_kernels(step, grad_to_none=grads) if device.type == "cuda" else None
        if kernels is not None:
            extra["kernels"] = kernels
        peak = harness.peak_memory_mb(step, device, grad_to_none=grads)
        results.append(harness.Result(BENCH, case, name, mode, dname, timings[name], peak, extra))
    return results


def _fused_config(shape: NFTLossShape):
    from nftcore.kernels.nft_loss import nft_loss_config

    return nft_loss_config(shape.N * shape.C, shape.B)


def _print_backend_ratios(results: list[harness.Result]) -> None:
    """The fused backend (native on CPU, Triton on CUDA) against the same public op on its reference backend and
    against the reference's autograd (`reference`), per case: p50 ratios of the interleaved runs above."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.case, r.mode, r.dtype), {})[r.provider] = r.timing.p50
    for (case, mode, dname), p50 in groups.items():
        fused = next((name for name in p50 if name in ("nftcore:native", "nftcore:triton")), None)
        if fused is None:
            continue
        parts = [f"{other} / {fused} = {p50[other] / p50[fused]:.2f}x" for other in ("nftcore:reference", "reference")
                 if other in p50]
        if FUSED_OP in p50 and "reference" in p50:
            parts.append(f"reference / {FUSED_OP} = {p50['reference'] / p50[FUSED_OP]:.2f}x")
        if parts:
            print(f"{case} {dname} {mode}: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="", help=f"'all' or comma-separated names from bench/shapes.py and the "
                                               f"demo's ({', '.join(SHAPES)}); default: qwen_image_edit_512 and "
                                               f"demo on CPU, all on CUDA")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated from " + ", ".join(DTYPES))
    p.add_argument("--mode", default="full", choices=["full", "fwd"], help="full = forward + backward (default)")
    p.add_argument("--kl", default="both", choices=["both", "on", "off"], help="with v_ref (kl_weight 1e-4), without")
    p.add_argument("--providers", default=f"{BASELINE},reference,{OP_REFERENCE},nftcore,{FUSED_OP},{COPY}",
                   help=f"{COPY} runs on CUDA only, {FUSED_OP} on CUDA and on CPU with the native kernels; "
                        f"{OP_REFERENCE}: the public op on its reference backend")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats on CPU (CUDA uses do_bench's time budget)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is steadier on "
                                                         "a shared 2-core machine")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    default = list(SHAPES) if device.type == "cuda" else ["qwen_image_edit_512", "demo"]
    shapes = pick(SHAPES, args.shape, default)
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    kls = {"both": [False, True], "on": [True], "off": [False]}[args.kl]
    providers = args.providers.split(",")

    harness.print_machine()
    results = []
    for shape in shapes:
        for dtype in dtypes:
            for with_ref in kls:
                results += bench_case(shape, dtype, with_ref, args.mode, providers, device, args)
    harness.print_table(results, baseline=BASELINE)
    _print_backend_ratios(results)
    harness.record(results, args.no_record)
    return results


if __name__ == "__main__":
    main()
