"""Throughput numbers for the step log: transformer FLOPs (and MFU on a known GPU) and peak memory.

FLOPs use the dense-transformer rule (Kaplan et al.; torchtitan and nanoGPT log the same): 2·N per token for a
forward, 6·N for a forward with its backward, N the transformer's base parameter count (LoRA adapters are a rounding
error and only one of them runs). Tokens are counted where they are spent, by a forward pre-hook on the
transformer: image tokens (target + source) plus text tokens of every call, split into calls with and without
autograd. So an NFT step's θ forward+backward counts 6·N per token and the old/reference forwards 2·N each, and a
rollout counts 2·N per token per ODE step. Attention's sequence-quadratic term is left out (small at 512² and what
the 6·N convention omits); activation-checkpoint recomputation happens inside the blocks, not the hooked root, so
it is not counted: this is model FLOPs, not hardware FLOPs.

MFU divides by the device's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM), from the table below or
$NFTCORE_PEAK_TFLOPS; on the CPU or an unknown GPU it is not reported (None), while TFLOP/s always is.

See docs/TRAINING.md, "Metrics".
"""

from __future__ import annotations

import os
import resource
import sys

import torch
from torch import nn

# Dense bf16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name (first match wins).
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0),
                    ("A800", 312.0), ("L40S", 362.1))


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device` for MFU, or None when unknown (CPU, an unlisted GPU without $NFTCORE_PEAK_TFLOPS)."""
    if os.environ.get("NFTCORE_PEAK_TFLOPS"):
        return float(os.environ["NFTCORE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of `model` without LoRA adapters (a sharded DTensor counts with its global shape)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)


class FlopCounter:
    """Counts the tokens every forward of `models` sees (copies of one transformer: full fine-tuning runs θ, θ_old
    and the reference as three), with and without autograd; `take()` turns them into FLOPs since the last call.
    Cheap: two shape reads per transformer call."""

    def __init__(self, models: list[nn.Module]):
        self.params = base_parameter_count(models[0])
        self.grad_tokens = self.nograd_tokens = 0
        self._handles = [m.register_forward_pre_hook(self._count, with_kwargs=True) for m in models]

    def _count(self, module, args, kwargs) -> None:
        image = args[0] if args else kwargs.get("hidden_states")
        text = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        tokens = image.shape[0] * (image.shape[1] + (text.shape[1] if text is not None else 0))
        if torch.is_grad_enabled():
            self.grad_tokens += tokens
        else:
            self.nograd_tokens += tokens

    def take(self) -> float:
        """Model FLOPs since the previous `take()`: 6·N per token with autograd, 2·N without."""
        flops = float(self.params) * (6 * self.grad_tokens + 2 * self.nograd_tokens)
        self.grad_tokens = self.nograd_tokens = 0
        return flops

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def throughput(flops: float, seconds: float, device: torch.device) -> dict[str, float | None]:
    """{"tflops": achieved TFLOP/s, "mfu": its share of the device peak, None where the peak is unknown}."""
    achieved = flops / seconds if seconds > 0 else 0.0
    peak = peak_flops(device)
    return {"tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 B): allocated device memory since the last reset on CUDA, else the process's peak
    resident set (never reset: the OS keeps only the high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux
