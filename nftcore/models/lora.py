"""Built-in LoRA: named adapters on (possibly fused) Linear layers, equal to PEFT LoRA on diffusers' modules.

Why not peft at run time: the MMDiT fuses diffusers' separate projections (to_q | to_k | to_v, and in FLUX single
blocks also proj_mlp) into one Linear per stream. PEFT would put one LoRA pair on the fused layer, a different
parameterisation from the released Edit-R1 checkpoints, whose pairs sit on each diffusers module. `LoRALinear` keeps
one pair per *segment* of output rows instead:

    y = x Wᵀ + b,   y[rows_s] += scale · (x A_sᵀ) B_sᵀ      A_s [r, in], B_s [out_s, r], scale = alpha / r

which is exactly PEFT's LoRA on each separate module (same init, same parameters, same gradients; AdamW and global-norm
clipping are elementwise/global, so training dynamics match too). The A's of all segments run as one GEMM
(`x · cat(A_s)ᵀ` → [.., S·r]), then one small GEMM per segment; rows without a segment (e.g. the MLP rows of a FLUX
single block when only attention is adapted) get no LoRA.

Adapters: every LoRA layer carries the same named adapters (default "default" = trained θ, "old" = sampling
policy). One adapter is active at a time; `adapters_disabled` gives the base (reference) velocity from the same
weights. `adapter_state(model, name)` names every tensor by its diffusers/PEFT key, so the old-policy soft
update is `soft_update_(adapter_state(m, "old"), adapter_state(m, "default"), eta)` and the EMA, export and import all
speak the same names.

Where targets come from (`default_targets`): a model with fused layers may provide

    model.lora_targets(include_mlp: bool) -> dict[str, list[tuple[str, slice]]]

mapping each Linear's path in `model.named_modules()` to its segments: (diffusers module path relative to the
transformer root, slice of the Linear's output rows), e.g. {"double_blocks.0.img_qkv": [("transformer_blocks.0.attn.
to_q", slice(0, 3072)), ("transformer_blocks.0.attn.to_k", slice(3072, 6144)), ...]}. Without the hook an `MMDiT`'s
targets are derived from its loader's name table (`checkpoint_io.key_map`, via `targets_from_key_map`), and models
named like diffusers (one Linear per module) are matched by suffix (`targets_from_suffixes`).

Apply LoRA after loading the base weights and before FSDP sharding / torch.compile. The base weight and bias keep
their Parameter objects and state-dict names (`LoRALinear` *is* an `nn.Linear`); adapter tensors add
`<path>.lora_A.<adapter>.<segment index>` / `lora_B` entries to `model.state_dict()`.

See docs/ALGORITHM.md §1.7 (targets, rank, init) and §11.14 (one pair per diffusers module).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nftcore.nft.old_policy import soft_update_

# Edit-R1's targets: the attention projections of every block, by diffusers module-name suffix.
# Suffix matching also hits FLUX single blocks' attn.to_q/k/v (they have no to_out: proj_out is their output).
ATTENTION_SUFFIXES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
# The optional MLP targets: FLUX double blocks (ff, ff_context), Qwen-Image blocks (img_mlp, txt_mlp), FLUX single
# blocks (proj_mlp in, proj_out out; proj_out also reads the attention output).
MLP_SUFFIXES = (
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "proj_mlp", "proj_out",
)

Targets = Mapping[str, Sequence[tuple[str, slice]]]
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Segment:
    """One diffusers module inside a (possibly fused) Linear: its name and its output rows [start, stop)."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter names must be identifiers (letters, digits, _), got {name!r}")


def _normalize_segments(segments: Sequence[tuple[str, slice]], out_features: int, where: str) -> tuple[Segment, ...]:
    """(name, slice) pairs → Segments sorted by row, checked to be in range, non-empty and non-overlapping."""
    result = []
    for entry in segments:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], slice)):
            raise ValueError(f"{where}: a segment must be (diffusers_name, slice), got {entry!r}")
        name, rows = entry
        start, stop, step = rows.indices(out_features)
        if step != 1 or rows.step not in (None, 1):
            raise ValueError(f"{where}: segment {name!r} must be a contiguous slice, got {rows}")
        if (rows.start is not None and rows.start != start) or (rows.stop is not None and rows.stop != stop):
            raise ValueError(f"{where}: segment {name!r} slice {rows} is outside the {out_features} output rows")
        if stop <= start:
            raise ValueError(f"{where}: segment {name!r} slice {rows} is empty")
        result.append(Segment(str(name), start, stop))
    if not result:
        raise ValueError(f"{where}: no segments given")
    result.sort(key=lambda s: s.start)
    for before, after in zip(result, result[1:]):
        if after.start < before.stop:
            raise ValueError(f"{where}: segments {before.name!r} and {after.name!r} overlap")
    return tuple(result)


class LoRALinear(nn.Linear):
    """An `nn.Linear` (sharing the original's frozen weight and bias) plus named LoRA adapters, one pair per segment.

    Build with `LoRALinear.from_linear`; `apply_lora` does that for a whole model. The forward adds the active
    adapter's update unless adapters are disabled or that adapter is merged into the weight.
    """

    def __init__(self, linear: nn.Linear, segments: Sequence[tuple[str, slice]] | None = None, *, where: str = ""):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is shared, not allocated
        _bump_generation()  # a model holding this layer from now on must be walked again
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        if segments is None:
            segments = [(where, slice(0, self.out_features))]
        self.segments = _normalize_segments(segments, self.out_features, where or "LoRALinear")
        self._adapted_width = sum(seg.size for seg in self.segments)  # output rows with an adapter
        self.lora_A = nn.ModuleDict()  # adapter → ParameterList of A_s [r, in]
        self.lora_B = nn.ModuleDict()  # adapter → ParameterList of B_s [out_s, r]
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self.adapted_rows: int | None = None  # only the first input rows (dim 0) get the update: adapter_per_row
        # Keep the last no-grad merged weight W + scale·BA for reuse while W, A and B are unchanged (see
        # `_merged_weight`); off by default: it costs one more copy of W. `enable_merged_weight_cache` turns it on.
        self.cache_merged = False
        self._merged_cache: tuple[tuple, torch.Tensor] | None = None
        # output rows in order: (start, stop, segment index or None for rows without LoRA)
        self._runs: list[tuple[int, int, int | None]] = []
        row = 0
        for index, seg in enumerate(self.segments):
            if seg.start > row:
                self._runs.append((row, seg.start, None))
            self._runs.append((seg.start, seg.stop, index))
            row = seg.stop
        if row < self.out_features:
            self._runs.append((row, self.out_features, None))

    @classmethod
    def from_linear(cls, linear: nn.Linear, segments: Sequence[tuple[str, slice]] | None = None, *,
                    where: str = "") -> LoRALinear:
        """Wrap `linear` (weights shared, not copied). `segments` default to one covering all rows, named `where`."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"{where or 'LoRALinear'}: can only wrap a plain nn.Linear, got {type(linear).__name__}")
        return cls(linear, segments, where=where)

    # ------------------------------------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, rank: int, alpha: float, *, init: str = "gaussian",
                    dtype: torch.dtype | None = torch.float32, generator: torch.Generator | None = None) -> None:
        """New adapter: A ~ N(0, (1/r)²) (PEFT's `init_lora_weights="gaussian"`, std = 1/r), B = 0, or all zeros
        with `init="zeros"`. Adapter tensors default to fp32 whatever the base dtype, so the optimizer, the
        old-policy blend and the EMA work at full precision; the forward casts at the boundary, as PEFT does."""
        _check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if init not in ("gaussian", "zeros"):
            raise ValueError(f"init must be 'gaussian' or 'zeros', got {init!r}")
        factory = dict(device=self.weight.device, dtype=dtype or self.weight.dtype)
        a_list, b_list = nn.ParameterList(), nn.ParameterList()
        for seg in self.segments:
            a = torch.zeros(rank, self.in_features, **factory)
            if init == "gaussian":
                # Drawn on the generator's device (a CPU generator is the usual seed source), then moved: the same
                # seed gives the same adapter on any device.
                draw_on = generator.device if generator is not None else a.device
                a.copy_(torch.empty(a.shape, dtype=a.dtype, device=draw_on).normal_(0.0, 1.0 / rank,
                                                                                    generator=generator))
            a_list.append(nn.Parameter(a))
            b_list.append(nn.Parameter(torch.zeros(seg.size, rank, **factory)))
        self.lora_A[name], self.lora_B[name] = a_list, b_list
        self.rank[name], self.alpha[name] = rank, float(alpha)

    def _adapter_params(self, name: str) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]:
        """(A_s..., B_s...) of adapter `name`, read from the lists' parameter tables each call (FSDP2 swaps the
        entries between sharded and gathered tensors): indexing a ParameterList element by element costs more per
        forward than a small model's GEMMs."""
        return (tuple(self.lora_A[name]._parameters.values()), tuple(self.lora_B[name]._parameters.values()))

    def scale(self, name: str) -> float:
        return self.alpha[name] / self.rank[name]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """`{"<diffusers module>.lora_A.weight": A_s, "<…>.lora_B.weight": B_s}` for each segment (live Parameters)."""
        out = {}
        for seg, a, b in zip(self.segments, self.lora_A[name], self.lora_B[name]):
            out[f"{seg.name}.lora_A.weight"] = a
            out[f"{seg.name}.lora_B.weight"] = b
        return out

    # -------------------------------------------------------------------------------------------------- forward

    def _adapter_in_use(self) -> str | None:
        """The adapter to add in forward; raises if a merged adapter would be silently wrong."""
        if self.merged_adapter is not None:
            if self.disabled or self.active_adapter != self.merged_adapter:
                raise RuntimeError(
                    f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge it before disabling "
                    f"adapters or switching to {self.active_adapter!r}"
                )
            return None
        if self.disabled:
            return None
        return self.active_adapter

    def _cat_a(self, name: str) -> torch.Tensor:
        """All segments' A stacked [S·r, in], so the first LoRA GEMM is one call."""
        a_list = self._adapter_params(name)[0]
        return a_list[0] if len(a_list) == 1 else torch.cat(a_list)

    def _add_update(self, y: torch.Tensor, h: torch.Tensor, name: str, *, inplace: bool = False) -> torch.Tensor:
        """y plus each segment's h_s B_sᵀ on its rows, where h = scale · x A_catᵀ [.., S·r]; `inplace` adds into y
        (a view of a no-grad output)."""
        b_list = self._adapter_params(name)[1]
        parts = h.split(self.rank[name], dim=-1) if len(b_list) > 1 else (h,)
        deltas = {seg.start: F.linear(part, b).to(y.dtype) for seg, part, b in zip(self.segments, parts, b_list)}
        if inplace:
            for a, b, s in self._runs:
                if s is not None:
                    y[..., a:b] += deltas[a]
            return y
        if len(self._runs) == 1:
            return y + deltas[0]
        # One add of the joined updates (zeros on rows without LoRA), not a slice of y per segment: each slice's
        # backward would allocate a zero gradient of y's full size.
        update = torch.cat([deltas[a] if s is not None else y.new_zeros(*y.shape[:-1], b - a)
                            for a, b, s in self._runs], dim=-1)
        return y + update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._adapter_in_use()
        if name is not None and self._merge_pays(x, name):
            if torch.is_grad_enabled():
                a_list, b_list = self._adapter_params(name)
                return _MergedLoRA.apply(self, name, 1, x, *a_list, *b_list)
            return self._updated_merged(x, name, lambda parts, w, out: _split_input_linear(parts, [w], self.bias,
                                                                                          out=out))
        y = F.linear(x, self.weight, self.bias)
        if name is None:
            return y
        a = self._cat_a(name)
        k = self._leading_rows(x)
        return self._updated(y, k, lambda: F.linear(_leading(x, k).to(a.dtype), a) * self.scale(name), name)

    def _leading_rows(self, x: torch.Tensor) -> int:
        """How many input rows (dim 0) get the update: all, or the first `adapted_rows`."""
        if self.adapted_rows is None:
            return x.shape[0]
        if not 0 < self.adapted_rows <= x.shape[0]:
            raise ValueError(f"adapter_per_row: the adapter is for the first {self.adapted_rows} rows, but the input "
                             f"has {x.shape[0]} (the first dim)")
        return self.adapted_rows

    def _updated(self, y: torch.Tensor, k: int, h, name: str) -> torch.Tensor:
        """y with the update h() [k, ..., S·r] added to its first k rows. The rows after them keep exactly the base
        output and cost no LoRA GEMM: the reference rows of the fused θ_old + reference pass."""
        if k == y.shape[0]:
            return self._add_update(y, h(), name)
        if not torch.is_grad_enabled():
            self._add_update(y[:k], h(), name, inplace=True)
            return y
        return torch.cat([self._add_update(y[:k], h(), name), y[k:]])

    def forward_split_input(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """`self(torch.cat(parts, -1))` without materialising the concatenation (FLUX single blocks' proj_out reads
        [attn ; mlp]): one GEMM per input column block, on the base weight and on A alike."""
        widths = [p.shape[-1] for p in parts]
        if sum(widths) != self.in_features:
            raise ValueError(f"input parts of widths {widths} do not add up to in_features {self.in_features}")
        name = self._adapter_in_use()
        if name is not None and self._merge_pays(parts[0], name):
            if torch.is_grad_enabled():
                a_list, b_list = self._adapter_params(name)
                return _MergedLoRA.apply(self, name, len(parts), *parts, *a_list, *b_list)
            return self._updated_merged(
                parts, name, lambda rows, w, out: _split_input_linear(rows, w.split(widths, dim=1), self.bias, out=out))
        y = _split_input_linear(parts, self.weight.split(widths, dim=1), self.bias)
        if name is None:
            return y
        a = self._cat_a(name)
        k = self._leading_rows(parts[0])

        def h():
            rows = [_leading(p, k).to(a.dtype) for p in parts]
            return _split_input_linear(rows, a.split(widths, dim=1), None) * self.scale(name)

        return self._updated(y, k, h, name)

    # ------------------------------------------------------------------------------- merged no-grad forward

    def _merge_pays(self, x: torch.Tensor, name: str) -> bool:
        """Whether this forward should run on W + scale·BA built on the fly instead of adding the LoRA branch.

        Only for fp32 weights outside autocast: the merged weight is rounded once in fp32, as accurate as the
        unmerged sum, where a bf16 copy would round the small update against the weight.

        Without grad (rollouts, the θ_old pass, evaluation) it pays when the branch's GEMMs over the tokens cost more
        than building the weight once per call: tokens·r·(S·in + out_lora) > r·in·out_lora + in·out (the branch's
        two thin GEMMs are also slow per FLOP).

        With grad (`_MergedLoRA`) the gradients of A and B come from the full [out, in] product dYᵀX, 2·in·out
        FLOPs per token against the branch's 6·r·(S·in + out_lora) in thin GEMMs that run several times slower per
        FLOP (rank 16 on width 64: 1.4-1.8x slower per layer, forward + backward). So it is taken when in·out ≤
        6·r·(S·in + out_lora), i.e. for small widths (the demo's), never at FLUX's (in 3072, rank 32: 16x the FLOPs);
        and only for a frozen W and bias on every input row (no `adapter_per_row`)."""
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return False
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():  # traced: the plain branch
            return False
        a_list, b_list = self._adapter_params(name)
        if a_list[0].dtype != torch.float32 or b_list[0].dtype != torch.float32:
            return False
        rank, adapted = self.rank[name], self._adapted_width
        if torch.is_grad_enabled():
            frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
            thin = 6 * rank * (len(self.segments) * self.in_features + adapted)
            return frozen and self.adapted_rows is None and self.in_features * self.out_features <= thin
        tokens = x.numel() // max(x.shape[-1], 1)
        if self.adapted_rows is not None:
            tokens = tokens // max(x.shape[0], 1) * self.adapted_rows
        branch = tokens * rank * (len(self.segments) * self.in_features + adapted)
        return branch > rank * self.in_features * adapted + self.in_features * self.out_features

    def _merged_weight(self, name: str) -> torch.Tensor:
        """W with each segment's rows plus scale · B_s A_s (one addmm per segment, nothing written to W).

        With `cache_merged` the result is kept and returned again while W, every A_s and B_s and the scale are the
        same tensors with the same contents: a rollout phase runs the same θ_old through every sampler step, and
        for a small model rebuilding the weight each call costs as much as the GEMMs. "Same contents" is read
        from autograd's version counters, which every in-place update (optimizer step, soft update, EMA, loading
        a checkpoint) bumps; writes through `.data` would not, and nftcore makes none."""
        scale = self.scale(name)
        a_list, b_list = self._adapter_params(name)
        key = None
        if self.cache_merged:
            key = (name, scale) + tuple((t.data_ptr(), t._version) for t in (self.weight, *a_list, *b_list))
            if self._merged_cache is not None and self._merged_cache[0] == key:
                return self._merged_cache[1]
        rows = [self.weight[a:b] if s is None else torch.addmm(self.weight[a:b], b_list[s], a_list[s], alpha=scale)
                for a, b, s in self._runs]
        merged = rows[0] if len(rows) == 1 else torch.cat(rows)
        if key is not None:
            self._merged_cache = (key, merged)
        return merged

    def _updated_merged(self, x, name: str, parts_linear):
        """`parts_linear(parts, merged weight, out)` on the adapted leading rows, with W on the rest
        (adapter_per_row), both written into one output. `x` is one tensor or a list of input column blocks
        (forward_split_input)."""
        parts = list(x) if isinstance(x, (list, tuple)) else [x]
        k = self._leading_rows(parts[0])
        merged = self._merged_weight(name)
        if k == parts[0].shape[0]:
            return parts_linear(parts, merged, None)
        out = parts[0].new_empty(*parts[0].shape[:-1], self.out_features)
        parts_linear([p[:k] for p in parts], merged, out[:k])  # leading-dim slices of `out` are contiguous
        parts_linear([p[k:] for p in parts], self.weight, out[k:])
        return out

    # ------------------------------------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W[rows_s] += scale · B_s A_s (computed in fp32, rounded once to the weight's dtype)."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged")
        self._add_to_weight(name, +1.0)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update again (bit-exact only for fp32 weights; low precision rounds twice)."""
        if self.merged_adapter is None:
            return
        self._add_to_weight(self.merged_adapter, -1.0)
        self.merged_adapter = None

    def _add_to_weight(self, name: str, sign: float) -> None:
        scale = sign * self.scale(name)
        for seg, a, b in zip(self.segments, self.lora_A[name], self.lora_B[name]):
            rows = self.weight[seg.start:seg.stop]
            update = (b.float() @ a.float()) * scale
            rows.copy_((rows.float() + update.to(rows.device)).to(rows.dtype))

    def extra_repr(self) -> str:
        names = ", ".join(f"{n}(r={self.rank[n]}, alpha={self.alpha[n]:g})" for n in self.lora_A)
        segs = ", ".join(f"{s.name}[{s.start}:{s.stop}]" for s in self.segments)
        return f"{super().extra_repr()}, adapters=[{names}], active={self.active_adapter!r}, segments=[{segs}]"


class _MergedLoRA(torch.autograd.Function):
    """y = Σ_i x_i · W_effᵀ[cols_i] + b with W_eff = W + scale · B_s A_s on each segment's rows: the LoRA layer
    with grad on the merged weight (see `LoRALinear._merge_pays`). x arrives as one tensor or as the input column
    blocks of `forward_split_input`. W and b are frozen; backward gives dx_i = dY · W_eff[:, cols_i] and, from
    G = dYᵀX [out, in], dB_s = scale · G_s A_sᵀ and dA_s = scale · B_sᵀ G_s (G_s: the segment's rows of G)."""

    @staticmethod
    def forward(ctx, layer: LoRALinear, name: str, n_parts: int, *tensors: torch.Tensor) -> torch.Tensor:
        parts, ab = tensors[:n_parts], tensors[n_parts:]
        widths = [p.shape[-1] for p in parts]
        merged = layer._merged_weight(name)
        y = _split_input_linear(parts, merged.split(widths, dim=1) if n_parts > 1 else [merged], layer.bias)
        ctx.save_for_backward(merged, *parts, *ab)
        ctx.n_parts, ctx.widths, ctx.scale, ctx.runs = n_parts, widths, layer.scale(name), layer._runs
        return y

    @staticmethod
    @once_differentiable  # a double backward through it raises instead of silently dropping second-order terms
    def backward(ctx, grad: torch.Tensor):
        merged, *saved = ctx.saved_tensors
        parts, ab = saved[:ctx.n_parts], saved[ctx.n_parts:]
        a_list, b_list = ab[:len(ab) // 2], ab[len(ab) // 2:]
        g = grad.reshape(-1, grad.shape[-1])
        needs = ctx.needs_input_grad[3:]
        d_parts = [None] * ctx.n_parts
        for i, (part, w) in enumerate(zip(parts, merged.split(ctx.widths, dim=1))):
            if needs[i]:
                d_parts[i] = (g @ w).view(part.shape)
        d_a, d_b = [None] * len(a_list), [None] * len(b_list)
        if any(needs[ctx.n_parts:]):
            full = torch.cat([g.t() @ p.reshape(-1, p.shape[-1]) for p in parts], dim=1)  # dYᵀX [out, in]
            for start, stop, s in ctx.runs:
                if s is not None:
                    rows = full[start:stop]
                    d_b[s] = (rows @ a_list[s].t()) * ctx.scale
                    d_a[s] = (b_list[s].t() @ rows) * ctx.scale
        return None, None, None, *d_parts, *d_a, *d_b


def _leading(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[:k], or x itself when that is all of it: a slice, even a whole one, costs a zero-filled gradient of x's size
    in backward."""
    return x if k == x.shape[0] else x[:k]


def _split_input_linear(parts: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                        bias: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i parts[i] · weights[i]ᵀ (+ bias), chaining addmm so no [.., Σ in_i] concatenation is built. `out`
    (contiguous, no grad) receives the result instead of a new tensor: the two row ranges of `_updated_merged`."""
    lead = parts[0].shape[:-1]
    flat = [p.reshape(-1, p.shape[-1]) for p in parts]
    if out is None:
        y = F.linear(flat[0], weights[0], bias)
    else:
        y = out.view(-1, out.shape[-1])
        if bias is None:
            torch.mm(flat[0], weights[0].t(), out=y)
        else:
            torch.addmm(bias, flat[0], weights[0].t(), out=y)
    for part, w in zip(flat[1:], weights[1:]):
        y = torch.addmm(y, part, w.t()) if out is None else y.addmm_(part, w.t())
    return y.view(*lead, y.shape[-1]) if out is None else out


def split_input_linear(linear: nn.Linear, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """`linear(torch.cat(parts, -1))` without the concatenation, LoRA-aware: for a model layer that is fed several
    input blocks (FLUX single blocks' proj_out reads [attn ; mlp]). Models should call this instead of slicing
    `linear.weight` directly, otherwise a LoRA on that layer is silently skipped."""
    if isinstance(linear, LoRALinear):
        return linear.forward_split_input(parts)
    widths = [p.shape[-1] for p in parts]
    return _split_input_linear(parts, linear.weight.split(widths, dim=1), linear.bias)


# ------------------------------------------------------------------------------------------------ model level


# Module walks are cached per model: adapter switches run around every sampler step, and walking a transformer's
# modules each time cost more than the LoRA GEMMs of a small model. The only way nftcore changes which LoRALinears a
# model holds is creating them (`apply_lora`), which bumps the generation and so invalidates every entry.
_layer_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_generation = 0


def _bump_generation() -> None:
    global _generation
    _generation += 1


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by module path, in module order (a new dict; the walk itself is cached)."""
    cached = _layer_cache.get(model)
    if cached is None or cached[0] != _generation:
        cached = (_generation, {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)})
        _layer_cache[model] = cached
    return dict(cached[1])


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call apply_lora first")
    return layers


def _check_has_adapter(layers: Mapping[str, LoRALinear], name: str) -> None:
    missing = [path for path, layer in layers.items() if name not in layer.lora_A]
    if missing:
        known = sorted(next(iter(layers.values())).lora_A.keys())
        raise ValueError(f"adapter {name!r} not found on {len(missing)} LoRA layer(s) (e.g. {missing[0]}); "
                         f"known adapters: {known}")


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names present on the model's LoRA layers (those of the first layer; all layers carry the same)."""
    layers = lora_layers(model)
    return list(next(iter(layers.values())).lora_A.keys()) if layers else []


def lora_suffixes(include_mlp: bool = False) -> tuple[str, ...]:
    """Edit-R1's diffusers module suffixes (attention projections), plus the MLPs when asked."""
    return ATTENTION_SUFFIXES + (MLP_SUFFIXES if include_mlp else ())


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    """`name` ends with `.<suffix>`. Unlike PEFT's rule, a bare top-level name never matches, so "proj_out" hits
    the FLUX single blocks' proj_out but not the model's final `proj_out`."""
    return any(name.endswith("." + s) for s in suffixes)


def targets_from_suffixes(model: nn.Module, suffixes: Sequence[str]) -> dict[str, list[tuple[str, slice]]]:
    """Targets for a model named like diffusers (unfused): every nn.Linear whose path ends with `.<suffix>` gets
    one LoRA pair over all its rows, named by its own path."""
    return {path: [(path, slice(0, module.out_features))] for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and _matches(path, suffixes)}


def targets_from_key_map(key_map: Mapping[str, Sequence[tuple[str, int]]],
                         suffixes: Sequence[str]) -> dict[str, list[tuple[str, slice]]]:
    """Targets from a loader's name table `{"<ours>.weight": [("<diffusers>.weight", rows), ...]}` (several parts =
    stacked along the output dim in that order, as `nftcore.models.checkpoint_io.key_map` describes fused
    Linears): each diffusers module matching a suffix becomes a segment over its rows of our Linear."""
    targets: dict[str, list[tuple[str, slice]]] = {}
    for ours, parts in key_map.items():
        if not ours.endswith(".weight"):
            continue
        row, segments = 0, []
        for theirs, rows in parts:
            module = theirs.removesuffix(".weight")
            if theirs.endswith(".weight") and _matches(module, suffixes):
                segments.append((module, slice(row, row + rows)))
            row += rows
        if segments:
            targets[ours.removesuffix(".weight")] = segments
    return targets


def default_targets(model: nn.Module, include_mlp: bool = False) -> dict[str, list[tuple[str, slice]]]:
    """Where LoRA goes by default, first that applies: the model's `lora_targets(include_mlp)` hook; for an
    `MMDiT`, its checkpoint name table (`checkpoint_io.key_map`); else diffusers-style suffix matching."""
    hook = getattr(model, "lora_targets", None)
    if callable(hook):
        return dict(hook(include_mlp=include_mlp))
    from .config import MMDiTConfig  # same package; imported lazily so lora.py stands alone for unfused models

    if isinstance(getattr(model, "config", None), MMDiTConfig):
        from .checkpoint_io import key_map

        return targets_from_key_map(key_map(model.config), lora_suffixes(include_mlp))
    return targets_from_suffixes(model, lora_suffixes(include_mlp))


def apply_lora(
    model: nn.Module,
    *,
    targets: Targets | Sequence[str] | None = None,
    rank: int = 32,
    alpha: float = 64.0,
    adapter_names: Sequence[str] = ("default", "old"),
    include_mlp: bool = False,
    trainable: str | None = "default",
    init: str = "gaussian",
    dtype: torch.dtype | None = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Wrap the target Linears in `LoRALinear` and give each the named adapters; return the layers by path.

    targets: {module path: [(diffusers name, output-row slice), ...]}, or a list of diffusers-style suffixes
    (`targets_from_suffixes`), or None for `default_targets(model, include_mlp)`. The first adapter is initialised
    (gaussian A, zero B) and copied into the others (Edit-R1: "old" starts as a copy of "default"), then made
    active. All base parameters of the model are frozen; only `trainable`'s adapter parameters require grad (None:
    nothing trainable). Calling again on already-wrapped layers adds new adapter names (same segments required).
    """
    names = list(adapter_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"adapter_names must be non-empty and unique, got {names}")
    for name in names:
        _check_adapter_name(name)
    if targets is None:
        targets = default_targets(model, include_mlp)
    elif not isinstance(targets, Mapping):
        targets = targets_from_suffixes(model, list(targets))
    if not targets:
        raise ValueError(f"no LoRA targets found in {type(model).__name__}")

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if init not in ("gaussian", "zeros"):
        raise ValueError(f"init must be 'gaussian' or 'zeros', got {init!r}")

    # validate everything before touching the model, so a bad call leaves it unchanged
    modules = dict(model.named_modules())
    missing = [path for path in targets if path not in modules]
    if missing:
        raise ValueError(f"LoRA targets not found in the model: {missing}")
    seen: dict[str, str] = {}
    plan: dict[str, tuple[nn.Linear, tuple[Segment, ...]]] = {}
    for path, segments in targets.items():
        module = modules[path]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {path} is a {type(module).__name__}, not an nn.Linear")
        wanted = _normalize_segments(segments, module.out_features, path)
        if isinstance(module, LoRALinear):
            if wanted != module.segments:
                raise ValueError(f"{path} already has LoRA with segments {module.segments}, not {wanted}")
            clash = [n for n in names if n in module.lora_A]
            if clash:
                raise ValueError(f"{path} already has adapter(s) {clash}")
        elif type(module) is not nn.Linear:
            raise ValueError(f"LoRA target {path} is a {type(module).__name__}; only plain nn.Linear is supported")
        for seg in wanted:
            if seg.name in seen:
                raise ValueError(f"diffusers name {seg.name!r} is claimed by both {seen[seg.name]} and {path}")
            seen[seg.name] = path
        plan[path] = (module, wanted)

    wrapped: dict[str, LoRALinear] = {}
    for path, (module, segments) in plan.items():
        if isinstance(module, LoRALinear):
            wrapped[path] = module
            continue
        layer = LoRALinear.from_linear(module, [(seg.name, slice(seg.start, seg.stop)) for seg in segments],
                                       where=path)
        parent_path, _, child = path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, child, layer)
        wrapped[path] = layer
    _bump_generation()  # the new layers are in place: walk the model again

    for layer in wrapped.values():
        for name in names:
            layer.add_adapter(name, rank, alpha, init=init if name == names[0] else "zeros", dtype=dtype,
                              generator=generator)
    for other in names[1:]:
        copy_adapter_(model, names[0], other)
    set_active_adapter(model, names[0])
    set_trainable_adapter(model, trainable)
    return wrapped


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Route every LoRA layer's forward through adapter `name` ("default" to train, "old" for rollouts); None runs
    the base weights (prefer `adapters_disabled` for a temporary switch). Does not change requires_grad.

    With activation checkpointing, blocks re-run their forward during backward with whatever adapter is active
    *then*: switch back (or use the `using_adapter` / `adapters_disabled` context managers) before `backward()`."""
    layers = _layers_or_raise(model)
    if name is not None:
        _check_has_adapter(layers, name)
    for layer in layers.values():
        layer.active_adapter = name


def active_adapter(model: nn.Module) -> str | None:
    actives = {layer.active_adapter for layer in _layers_or_raise(model).values()}
    if len(actives) != 1:
        raise RuntimeError(f"LoRA layers disagree on the active adapter: {sorted(map(str, actives))}")
    return actives.pop()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base weights only (the frozen reference policy) inside the block; restores each layer's state."""
    layers = list(_layers_or_raise(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


@contextmanager
def using_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Temporarily make `name` the active adapter (e.g. "old" for a rollout), restoring the previous one after."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, previous)


@contextmanager
def adapter_per_row(model: nn.Module, name: str, rows: int) -> Iterator[None]:
    """Adapter `name` active on the first `rows` input rows (first dim of every LoRA layer's input) and off on the
    rest: one forward gives the adapted and the base model's outputs side by side (θ_old and the reference of the NFT
    update in one pass), and the base rows pay no LoRA GEMM. Restores each layer's state after."""
    by_path = _layers_or_raise(model)
    _check_has_adapter(by_path, name)
    layers = list(by_path.values())
    before = [(layer.active_adapter, layer.disabled, layer.adapted_rows) for layer in layers]
    for layer in layers:
        layer.active_adapter, layer.disabled, layer.adapted_rows = name, False, int(rows)
    try:
        yield
    finally:
        for layer, (active, disabled, adapted_rows) in zip(layers, before):
            layer.active_adapter, layer.disabled, layer.adapted_rows = active, disabled, adapted_rows


def enable_merged_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Let every LoRA layer keep its last no-grad merged weight W + scale·BA (`LoRALinear._merged_weight`) and
    reuse it while the weights are unchanged; `enabled=False` turns that off and frees the kept weights. Returns the
    bytes the kept weights may take at most (one copy of each adapted layer's weight).

    Only for unsharded models: under FSDP2 a layer's weight is a gathered buffer that is refilled in place."""
    layers = _layers_or_raise(model).values()
    for layer in layers:
        layer.cache_merged, layer._merged_cache = enabled, None
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) if enabled else 0


def adapter_state(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s tensors keyed by their PEFT names without prefix ("<diffusers module>.lora_A.weight" and
    ".lora_B.weight"): the live Parameters, so in-place updates (soft update, EMA copy-back, loading) act on the
    model. Keys are the same for every adapter, which is what `soft_update_`/`EMA` need to pair them."""
    layers = _layers_or_raise(model)
    _check_has_adapter(layers, name)
    state: dict[str, nn.Parameter] = {}
    for layer in layers.values():
        state.update(layer.adapter_tensors(name))
    return state


def trainable_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """Adapter `name`'s Parameters (for the optimizer), in the stable order of `adapter_state`."""
    return list(adapter_state(model, name).values())


def set_trainable_adapter(model: nn.Module, name: str | None) -> None:
    """requires_grad only on adapter `name`'s parameters; every other parameter of the model (base weights, other
    adapters) is frozen. None freezes everything."""
    if name is not None:
        _check_has_adapter(_layers_or_raise(model), name)
    for p in model.parameters():
        p.requires_grad_(False)
    if name is not None:
        for p in trainable_parameters(model, name):
            p.requires_grad_(True)


def copy_adapter_(model: nn.Module, source: str, target: str) -> None:
    """target ← source, in place (the `soft_update_` with η = 0: Edit-R1's old ← default at initialisation)."""
    soft_update_(adapter_state(model, target), adapter_state(model, source), 0.0)


def lora_config(model: nn.Module, name: str) -> tuple[int, float]:
    """(rank, alpha) of adapter `name`; raises if the layers disagree (apply_lora gives them all the same)."""
    layers = _layers_or_raise(model)
    _check_has_adapter(layers, name)
    configs = {(layer.rank[name], layer.alpha[name]) for layer in layers.values()}
    if len(configs) != 1:
        raise ValueError(f"adapter {name!r} has mixed (rank, alpha) across layers: {sorted(configs)}")
    return configs.pop()


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Add adapter `name` (default: the active one) into the base weights for inference and make it active; the
    output is unchanged while merged. Disabling or switching adapters while merged raises until `unmerge_adapter`."""
    layers = _layers_or_raise(model)
    name = active_adapter(model) if name is None else name
    if name is None:
        raise ValueError("no adapter is active; name the adapter to merge")
    _check_has_adapter(layers, name)
    merged = [path for path, layer in layers.items() if layer.merged_adapter is not None]
    if merged:
        raise RuntimeError(f"an adapter is already merged (e.g. in {merged[0]}); unmerge it first")
    for layer in layers.values():
        layer.merge(name)
        layer.active_adapter = name


def unmerge_adapter(model: nn.Module) -> None:
    """Subtract whatever adapter is merged, restoring the base weights (to rounding for low-precision weights)."""
    for layer in _layers_or_raise(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module, name: str = "default") -> int:
    """Number of elements in adapter `name` (r·(in + out) per diffusers projection)."""
    return sum(math.prod(p.shape) for p in trainable_parameters(model, name))
