"""`score_logits`: log-probabilities of a few chosen tokens from the final hidden state, never the [M, V] logits.

The reward judge's score is the expected digit, sum_k k * p_k / 5, with p the softmax over the logits of "0".."5"
at the last position. `score_logits(hidden, lm_head.weight, digit_ids)` gives the log of
those p in `subset` mode; `full` mode gives the true vocabulary log-probabilities of the same ids (logit - logsumexp
over all V) for callers that want calibrated probabilities. The score: docs/ALGORITHM.md §3.3 and §11.6.

One `torch.library.custom_op` with a fake implementation (so `torch.compile` sees one opaque node); `dispatch` picks
the backend per call (the op pattern: docs/DESIGN.md §5):

- Triton (`nftcore.kernels.score_logits`): one streaming pass over the head on CUDA, or on CPU under the interpreter
  with ``NFTCORE_FORCE_TRITON=1``.
- Native (CPU, when `nftcore._C` is built: `csrc/score_logits.cpp`): fixed-order fp32 dot products for the K selected
  logits; in full mode the head streams in the reference's chunks (same byte budgets, sized here by `chunk_rows`),
  one library GEMM per chunk and a fused online logsumexp over its logits.
- Reference (CPU fallback, and everywhere Triton is disabled): the same algorithm in PyTorch, streaming the head in
  vocabulary chunks with a running logsumexp, so its memory is bounded by two byte budgets, not by M x V.

Gradient: `hidden` gets one (closed form below, computed by a chunked PyTorch backward on every device: the reward is
inference-only, so no backward kernel); `weight` and `token_ids` do not, and a backward that needs the head's gradient
raises (freeze or detach the head). With out[m, k] = z[m, id_k] - lse[m] and p the softmax behind lse (over V in
full mode, over the K ids in subset mode):

    d out[m, k] / d hidden[m] = W[id_k] - sum_v p[m, v] W[v]
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import torch

from . import checks
from .dispatch import Backend, dispatch

OP = "score_logits"
MODES = ("subset", "full")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Must equal kernels/score_logits.py MAX_K (a test checks): the Triton finalize kernel keeps all K logits of a row
# block in one tile. The reference has no such limit, but every backend accepts the same inputs.
MAX_K = 256

# Reference chunking. The [M, C] fp32 logits of one chunk stay under LOGIT_CHUNK_BYTES; a 16-bit head is converted
# chunk by chunk into one fp32 staging buffer of at most STAGE_CHUNK_BYTES (CPU matmul needs one dtype, and bf16 GEMMs
# on CPU are slow and round their output to bf16).
# 2 MiB each: at the Qwen2.5-VL-7B head (H = 3584, V = 152064) and M = 64 that is ~2 MiB live (fp32 head) or ~2.1 MiB
# (16-bit head) instead of the 78 MiB of fp32 logits + log_softmax output; chunks stay big enough (146 rows bf16,
# 8192 fp32) that the per-chunk overhead is small next to the matmul.
LOGIT_CHUNK_BYTES = 2 * 2**20
STAGE_CHUNK_BYTES = 2 * 2**20
# Caps a chunk at small M (M = 1 would otherwise take the whole vocabulary in one chunk): 5 chunks at V = 152064. Few
# chunks matter on a shared CPU: each costs ~8 small ops, and when other processes hold the cores an OpenMP pool
# waits for its threads, so a small op can take milliseconds instead of microseconds.
MAX_CHUNK_ROWS = 32768
MIN_CHUNK_ROWS = 16  # a floor so a huge M or H never degenerates into row-at-a-time loops


# ----------------------------------------------------------------------------------------------------------------
# Reference backend: chunked PyTorch, fp32 arithmetic.


def chunk_rows(M: int, H: int, weight_dtype: torch.dtype, V: int) -> int:
    """Vocabulary rows per reference chunk under the byte budgets above."""
    rows = min(MAX_CHUNK_ROWS, LOGIT_CHUNK_BYTES // (4 * max(M, 1)))
    if weight_dtype != torch.float32:
        rows = min(rows, STAGE_CHUNK_BYTES // (4 * H))
    return max(MIN_CHUNK_ROWS, min(rows, V))


def _head_chunks(weight: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """Yield the head as fp32 [C, H] chunks: views of an fp32 head, or one reused staging buffer for a 16-bit one."""
    V, H = weight.shape
    if weight.dtype == torch.float32:
        for v0 in range(0, V, rows):
            yield weight[v0:v0 + rows]
        return
    stage = torch.empty((min(rows, V), H), dtype=torch.float32, device=weight.device)
    for v0 in range(0, V, rows):
        n = min(rows, V - v0)
        chunk = stage[:n]
        chunk.copy_(weight[v0:v0 + n])
        yield chunk


def _reference_forward(hidden, weight, token_ids, full):
    h = hidden.float()  # [M, H]
    w_sel = weight.index_select(0, token_ids).float()  # [K, H]
    z_sel = h @ w_sel.T  # [M, K]
    if full:
        # Online logsumexp: running max m and sum s of exp(z - m) per row, one [M, C] chunk of logits at a time,
        # exponentiated in place (torch.logsumexp would add a second [M, C] temporary and ~5 more small ops).
        m = h.new_full((h.shape[0],), float("-inf"))  # [M]
        s = h.new_zeros((h.shape[0],))  # [M]
        for w_c in _head_chunks(weight, chunk_rows(h.shape[0], h.shape[1], weight.dtype, weight.shape[0])):
            z = h @ w_c.T  # [M, C]: the only logits alive, never [M, V]
            m_new = torch.maximum(m, z.amax(dim=1))
            s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
            m = m_new
            del z  # else the next chunk's logits are allocated while these are still referenced: 2 chunks live
        lse = m + torch.log(s)
    else:
        lse = torch.logsumexp(z_sel, dim=1)
    return z_sel - lse[:, None], lse


def _reference_backward(grad_out, grad_lse, hidden, weight, token_ids, lse, full):
    h = hidden.float()
    w_sel = weight.index_select(0, token_ids).float()  # [K, H]
    g = grad_out.float()  # [M, K]
    coef = grad_lse.float() - g.sum(dim=1)  # [M]: weight of E_p[W] (each out[:, k] has -lse; lse itself has +lse)
    if full:
        expected_w = torch.zeros_like(h)  # [M, H]: sum_v p[m, v] W[v], streamed like the forward
        for w_c in _head_chunks(weight, chunk_rows(h.shape[0], h.shape[1], weight.dtype, weight.shape[0])):
            p = (h @ w_c.T).sub_(lse[:, None]).exp_()  # [M, C] softmax probabilities of this chunk
            expected_w.addmm_(p, w_c)
            del p
    else:
        expected_w = torch.exp(h @ w_sel.T - lse[:, None]) @ w_sel
    return (g @ w_sel + coef[:, None] * expected_w).to(hidden.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton backend (imported on first use, so `TRITON_INTERPRET` can be set before the kernels are defined).


def _triton_forward_impl():
    from nftcore.kernels.score_logits import score_logits_forward

    def impl(hidden, weight, token_ids, full):
        return score_logits_forward(hidden, weight, token_ids, full, validate_ids=False)  # the op checked them

    return impl


# ----------------------------------------------------------------------------------------------------------------
# Native CPU backend (csrc/score_logits.cpp; the module is loaded by the dispatcher before this loader runs).


def _native_forward_impl():
    from nftcore._native import op

    kernel = op("score_logits_forward")

    def impl(hidden, weight, token_ids, full):
        # The chunk size is decided here, from the same budgets as the reference's, so both hold the same memory.
        rows = chunk_rows(hidden.shape[0], hidden.shape[1], weight.dtype, weight.shape[0])
        return tuple(kernel(hidden, weight, token_ids, full, rows))

    return impl


_FORWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_forward, Backend.TRITON: _triton_forward_impl,
                  Backend.NATIVE: _native_forward_impl}
# The backward is PyTorch on every device: it exists for completeness (reward gradients w.r.t. the hidden state),
# not for speed, and streams the head like the reference forward.
_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_backward}


# ----------------------------------------------------------------------------------------------------------------
# The custom ops.


@torch.library.custom_op("nftcore::score_logits", mutates_args=())
def _score_logits_op(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, full: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = dispatch(OP, hidden.device, _FORWARD_IMPLS)
    return impl(hidden, weight, token_ids, full)


@_score_logits_op.register_fake
def _(hidden, weight, token_ids, full):
    M, K = hidden.shape[0], token_ids.shape[0]
    return hidden.new_empty((M, K), dtype=torch.float32), hidden.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("nftcore::score_logits_backward", mutates_args=())
def _score_logits_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    token_ids: torch.Tensor, lse: torch.Tensor, full: bool,
) -> torch.Tensor:
    impl = dispatch(OP + "_backward", hidden.device, _BACKWARD_IMPLS)
    return impl(grad_out, grad_lse, hidden, weight, token_ids, lse, full)


@_score_logits_backward_op.register_fake
def _(grad_out, grad_lse, hidden, weight, token_ids, lse, full):
    return torch.empty_like(hidden)


def _setup_context(ctx, inputs, output):
    hidden, weight, token_ids, full = inputs
    ctx.save_for_backward(hidden, weight, token_ids, output[1])
    ctx.full = full


def _backward(ctx, grad_out, grad_lse):
    hidden, weight, token_ids, lse = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            f"{OP}: no gradient for `weight` (the LM head); freeze it (`weight.requires_grad_(False)`) or pass "
            "`weight.detach()` - only `hidden` is differentiable"
        )
    grad_hidden = None
    if ctx.needs_input_grad[0]:
        M, K = hidden.shape[0], token_ids.shape[0]
        grad_hidden = _score_logits_backward_op(
            hidden.new_zeros((M, K), dtype=torch.float32) if grad_out is None else grad_out.contiguous(),
            hidden.new_zeros((M,), dtype=torch.float32) if grad_lse is None else grad_lse.contiguous(),
            hidden, weight, token_ids, lse, ctx.full,
        )
    return grad_hidden, None, None, None  # weight (refused above), token_ids (integer), full (flag)


_score_logits_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def _ids_tensor(token_ids, device: torch.device, vocab: int) -> torch.Tensor:
    """`token_ids` as a contiguous int64 [K] tensor on `device`, validated; ValueError naming it otherwise.

    A list is checked on the host and its device copy cached (the reward passes the same six ids every call, and a
    fresh host-to-device copy per call would cost a sync on CUDA). A tensor's values need one device-to-host copy.
    Value checks are skipped while torch.compile traces (a host sync is a graph break).
    """
    compiling = torch.compiler.is_compiling()
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise ValueError(f"{OP}: `token_ids` must be an integer tensor, got {token_ids.dtype}")
        _check_ids_shape(token_ids.shape)
        if not compiling:
            _check_id_values(token_ids.tolist(), vocab)
        return token_ids.to(device=device, dtype=torch.int64).contiguous()
    if isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes)):
        values = list(token_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            raise ValueError(f"{OP}: `token_ids` must be integers, got {values!r}")
        _check_ids_shape((len(values),))
        _check_id_values(values, vocab)
        if compiling:
            return torch.tensor(values, dtype=torch.int64, device=device)
        return _cached_ids(tuple(values), device)
    raise ValueError(f"{OP}: `token_ids` must be a 1-D integer tensor or a sequence of ints, got "
                     f"{type(token_ids).__name__}")


@functools.lru_cache(maxsize=64)
def _cached_ids(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)  # never written: the ops only read it


def _check_ids_shape(shape) -> None:
    if len(shape) != 1:
        raise ValueError(f"{OP}: `token_ids` must be 1-D [K], got shape [{', '.join(map(str, shape))}]")
    if not 1 <= shape[0] <= MAX_K:
        raise ValueError(f"{OP}: `token_ids` must hold between 1 and {MAX_K} ids, got {shape[0]}")


def _check_id_values(values: list[int], vocab: int) -> None:
    """Distinct and in [0, V)."""
    bad = [i for i in values if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{OP}: `token_ids` must lie in [0, V) = [0, {vocab}) (V = weight.shape[0]); "
                         f"out of range: {bad}")
    dup = sorted({i for i in values if values.count(i) > 1})
    if dup:
        raise ValueError(f"{OP}: `token_ids` must be distinct; repeated: {dup}")


def score_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor | Sequence[int],
    *,
    mode: str = "subset",
) -> torch.Tensor:
    """Log-probabilities of `token_ids` given final hidden states, without materialising [M, V] logits.

    Args:
        hidden: [M, H] fp16/bf16/fp32, the final-normed hidden state at the scored position (e.g.
            `model.model(**inputs).last_hidden_state[:, -1]`); any row stride.
        weight: [V, H] same dtypes, the LM head (`lm_head.weight`), unit stride along H. Never copied.
        token_ids: [K] distinct ids in [0, V), 1 <= K <= 256: a list of ints (e.g. the ids of "0".."5"; derive them
            from the tokenizer rather than hard-coding them) - checked on the host and kept on the device between
            calls - or an integer tensor, whose values cost one device-to-host copy per call to check.
        mode: "subset" - log-softmax over the K selected logits (what the expected-digit reward needs; reads only K
            rows of the head); "full" - true vocabulary log-probabilities, logit - logsumexp over all V (streams the
            head once).

    Returns:
        [M, K] float32 log-probabilities (exp sums to 1 over K in subset mode, to <= 1 in full mode).

    Only `hidden` is differentiable; a backward that needs the head's gradient raises.
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        checks.check_tensor(OP, name, x)
        if x.dim() != 2:
            raise ValueError(f"{OP}: `{name}` must be 2-D ([M, H] / [V, H]), got shape {checks.shape_str(x)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{OP}: `{name}` must be float16/bfloat16/float32, got {x.dtype}")
    if mode not in MODES:
        raise ValueError(f"{OP}: `mode` must be one of {MODES}, got {mode!r}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: `hidden` is [M, H] = {checks.shape_str(hidden)} but `weight` is [V, H] = "
                         f"{checks.shape_str(weight)}; the hidden sizes H differ")
    checks.check_same_device(OP, hidden=hidden, weight=weight)
    if weight.stride(1) != 1:
        raise ValueError(f"{OP}: `weight` must have unit stride along H (row-major [V, H], as nn.Linear stores it), "
                         f"got strides {weight.stride()}; it is not copied implicitly (the head is ~1 GB)")
    ids = _ids_tensor(token_ids, hidden.device, weight.shape[0])
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()  # [M, H] is small; the kernels need unit stride along H
    out, _lse = _score_logits_op(hidden, weight, ids, mode == "full")
    return out
