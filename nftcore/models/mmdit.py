"""`MMDiT`: one compact transformer for FLUX.1(-Kontext) and Qwen-Image(-Edit), numerically equal to diffusers 0.42's
FluxTransformer2DModel / QwenImageTransformer2DModel and callable with their keyword arguments.

Data flow of one forward (C = heads x head_dim, Nt text tokens, Ni image tokens = target then source):

    hidden_states [B, Ni, in]  -> img_in            -> img [B, Ni, C]
    encoder_hidden_states      -> (RMSNorm) txt_in  -> txt [B, Nt, C]
    sigma, guidance, pooled    -> cond              -> temb [B, C];  vec = SiLU(temb), shared by every block
    ids / img_shapes           -> RoPE tables (cos, sin) [(B,) Nt + Ni, D/2] over [text ; image], once
    double blocks (img, txt) -> [single blocks over cat(txt, img), FLUX] -> final AdaLN + projection on image tokens

What differs by family lives in three places: the conditioning embedder, the text input (Qwen-Image's RMSNorm) and
the RoPE positions. Blocks are `nn.ModuleList`s (`double_blocks`, `single_blocks`) so FSDP2 can shard block by block,
and each block can be recomputed in backward (`set_activation_checkpointing`).

See docs/ALGORITHM.md §6.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import DoubleStreamBlock, SingleStreamBlock, modulated
from .config import MMDiTConfig
from .embeddings import FluxConditioning, QwenConditioning
from .layers import rms_norm
from .rope import flux_rope, normalize_img_shapes, qwen_rope


@dataclass
class MMDiTOutput:
    """What `forward(return_dict=True)` returns, like diffusers' Transformer2DModelOutput: `.sample` [B, Ni, out]."""

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A float, 0-d or [B] tensor -> [B] tensor (diffusers requires [B]; a scalar is broadcast here)."""
    t = torch.as_tensor(value, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"`{name}` must be a scalar or [B] = [{batch}], got {list(t.shape)}")
    return t


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        f = dict(dtype=dtype, device=device)
        c, cfg = config.hidden_size, config
        self.img_in = nn.Linear(cfg.in_channels, c, **f)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, c, **f)
        if cfg.family == "flux":
            self.txt_norm = None
            self.cond = FluxConditioning(c, cfg.pooled_projection_dim, cfg.guidance_embeds, **f)
        else:
            self.txt_norm = nn.Parameter(torch.ones(cfg.joint_attention_dim, **f))  # RMSNorm weight
            self.cond = QwenConditioning(c, **f)
        block_args = (c, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_hidden_dim, cfg.eps)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*block_args, **f) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(*block_args, **f) for _ in range(cfg.num_single_layers))
        self.final_mod = nn.Linear(c, 2 * c, **f)  # scale, shift (diffusers' AdaLayerNormContinuous order)
        self.final_proj = nn.Linear(c, cfg.out_features, **f)

    # ------------------------------------------------------------------------------------------------- properties

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in execution order (the units FSDP2 shards and checkpointing recomputes)."""
        return [*self.double_blocks, *self.single_blocks]

    def set_activation_checkpointing(self, enabled: bool = True, *, every: int = 1) -> None:
        """Recompute blocks in backward instead of keeping their activations (torch.utils.checkpoint, non-reentrant):
        every `every`-th block when enabled (1 = all), none when disabled."""
        for i, block in enumerate(self.blocks):
            block.checkpointing = bool(enabled) and i % max(1, every) == 0

    # diffusers' spellings, so code written for a diffusers transformer keeps working
    def enable_gradient_checkpointing(self) -> None:
        self.set_activation_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self.set_activation_checkpointing(False)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(block.checkpointing for block in self.blocks)

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """No-op stand-in for diffusers' CacheMixin.cache_context, which its pipelines wrap every call in."""
        yield

    # ------------------------------------------------------------------------------------------------------ I/O

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, subfolder: str | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "MMDiT":
        """Load a diffusers-format transformer folder, e.g. `from_pretrained(pipeline_dir, subfolder="transformer",
        dtype=torch.bfloat16)`. dtype None keeps the checkpoint's. See `checkpoint_io.load_pretrained`."""
        from .checkpoint_io import load_pretrained

        folder = Path(folder) / subfolder if subfolder else Path(folder)
        return load_pretrained(cls, folder, dtype=dtype, device=device)

    def save_pretrained(self, folder: str | Path, *, max_shard_size: int | str = "10GB", params=None) -> None:
        """Write the diffusers layout back (see `checkpoint_io.save_pretrained`)."""
        from .checkpoint_io import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size, params=params)

    # -------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        timestep: torch.Tensor | float,
        pooled_projections: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        img_shapes: list | tuple | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Any = None,
        controlnet_single_block_samples: Any = None,
        controlnet_blocks_repeat: bool = False,
        additional_t_cond: Any = None,
        return_dict: bool = True,
        num_output_tokens: int | None = None,
    ) -> MMDiTOutput | tuple[torch.Tensor]:
        """The diffusers transformer call. Everything after `encoder_hidden_states` is keyword-only because the two
        diffusers classes order their positional arguments differently.

        FLUX:       hidden_states [B, Ni, in], encoder_hidden_states [B, Nt, joint], pooled_projections [B, pooled],
                    timestep (sigma in [0, 1]) [B], img_ids [Ni, 3], txt_ids [Nt, 3], guidance [B] if distilled.
        Qwen-Image: hidden_states, encoder_hidden_states, encoder_hidden_states_mask [B, Nt] (1 = real token) or
                    None, timestep [B], img_shapes [[(1, h, w), ...]] * B (target first, then sources).
        Both take sigma as diffusers' transformers do (they multiply by 1000 inside); a float or 0-d tensor is
        broadcast over the batch. `num_output_tokens` (nftcore only) projects just the first n image tokens (the
        edit target), skipping the final layer's work on source tokens. Returns [B, Ni or n, out] as `.sample` or a
        1-tuple. ControlNet residuals, IP-adapters and LoRA scales are not supported and raise.
        """
        cfg = self.config
        self._reject_unsupported(joint_attention_kwargs, attention_kwargs, controlnet_block_samples,
                                 controlnet_single_block_samples, controlnet_blocks_repeat, additional_t_cond)
        batch, n_img = hidden_states.shape[:2]
        n_txt = encoder_hidden_states.shape[1]
        if num_output_tokens is not None and not 1 <= num_output_tokens <= n_img:
            raise ValueError(f"num_output_tokens must be in [1, {n_img}] (the image tokens), got {num_output_tokens}")
        device, act_dtype = hidden_states.device, hidden_states.dtype
        timestep = _per_sample(timestep, batch, device, "timestep")

        img = self.img_in(hidden_states)  # [B, Ni, C]
        mask = None
        if cfg.family == "flux":
            if pooled_projections is None or img_ids is None or txt_ids is None:
                raise ValueError("FLUX forward needs pooled_projections, img_ids and txt_ids")
            if encoder_hidden_states_mask is not None or img_shapes is not None:
                raise ValueError("encoder_hidden_states_mask / img_shapes are Qwen-Image arguments; FLUX takes "
                                 "img_ids / txt_ids and no text mask")
            g = None if guidance is None else _per_sample(guidance, batch, device, "guidance")
            temb = self.cond(timestep, pooled_projections, g, act_dtype)
            txt = self.txt_in(encoder_hidden_states)
            rope = self._rope((txt_ids, img_ids), (str(device),),
                              lambda: flux_rope(txt_ids.to(device), img_ids.to(device), cfg.axes_dims_rope,
                                                cfg.rope_theta))
        else:
            if img_shapes is None:
                raise ValueError("Qwen-Image forward needs img_shapes, e.g. [[(1, h, w), (1, hs, ws)]] * B")
            if pooled_projections is not None or img_ids is not None or txt_ids is not None:
                raise ValueError("pooled_projections / img_ids / txt_ids are FLUX arguments; Qwen-Image takes "
                                 "img_shapes and encoder_hidden_states_mask")
            if guidance is not None:
                raise ValueError("Qwen-Image has no guidance embedding (diffusers 0.42 fails on `guidance` too); "
                                 "pass guidance=None")
            temb = self.cond(timestep, act_dtype)
            txt = self.txt_in(rms_norm(encoder_hidden_states, self.txt_norm, cfg.eps))
            shapes = normalize_img_shapes(img_shapes, batch)
            tokens = {sum(f * h * w for f, h, w in images) for images in shapes}
            if tokens != {n_img}:
                raise ValueError(f"img_shapes {img_shapes!r} describe {sorted(tokens)} image tokens, hidden_states "
                                 f"has {n_img}")
            rope = self._rope((), (repr(shapes), n_txt, str(device)),
                              lambda: qwen_rope(shapes, n_txt, cfg.axes_dims_rope, cfg.rope_theta, device))
            if encoder_hidden_states_mask is not None:
                if encoder_hidden_states_mask.shape != (batch, n_txt):
                    raise ValueError(f"encoder_hidden_states_mask must be [B, Nt] = [{batch}, {n_txt}], got "
                                     f"{list(encoder_hidden_states_mask.shape)}")
                image_keys = torch.ones(batch, n_img, dtype=torch.bool, device=device)
                mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), image_keys], dim=1)  # [B, Nt + Ni]

        vec = F.silu(temb)  # [B, C], the input of every modulation Linear
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rope, mask)
        if len(self.single_blocks):
            x = torch.cat([txt, img], dim=1)  # joined once for all single blocks (diffusers re-joins per block)
            del txt, img  # without grad nothing else holds them: not kept alive through every single block
            # The last block computes only the returned tokens (the others only feed its keys and values).
            keep = None if num_output_tokens is None else (n_txt, n_txt + num_output_tokens)
            for i, block in enumerate(self.single_blocks):
                x = self._run(block, x, vec, rope, mask, keep if i == len(self.single_blocks) - 1 else None)
            img = x if keep is not None else x[:, n_txt:]
        elif num_output_tokens is not None:
            img = img[:, :num_output_tokens]
        scale, shift = self.final_mod(vec.to(img.dtype)).chunk(2, dim=-1)
        out = modulated(self.final_proj, img, shift, scale, cfg.eps)  # [B, Ni, out]
        return MMDiTOutput(out) if return_dict else (out,)

    def _rope(self, ids: tuple[torch.Tensor, ...], key: tuple, build):
        """The (cos, sin) tables of the previous call when its positions were the same: a sampler and the training
        passes call the model many times with one set of positions, and the tables cost ~0.2 ms to build. Equal
        means equal id values (compared, not trusted by address) and an equal `key`. Ids on an accelerator are not
        compared (that would wait for the device on every call): their tables are built each time."""
        if any(t.device.type != "cpu" for t in ids):
            return build()
        cached = self.__dict__.get("_rope_cache")
        if (cached is not None and cached[1] == key and len(cached[0]) == len(ids)
                and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                        for a, b in zip(cached[0], ids))):
            return cached[2]
        tables = build()
        self.__dict__["_rope_cache"] = (tuple(t.clone() for t in ids), key, tables)  # not a module attribute
        return tables

    @staticmethod
    def _run(block: nn.Module, *args):
        if block.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @staticmethod
    def _reject_unsupported(joint_attention_kwargs, attention_kwargs, controlnet_block_samples,
                            controlnet_single_block_samples, controlnet_blocks_repeat, additional_t_cond) -> None:
        bad = [name for name, value in (("joint_attention_kwargs", joint_attention_kwargs),
                                        ("attention_kwargs", attention_kwargs)) if value]
        bad += [name for name, value in (("controlnet_block_samples", controlnet_block_samples),
                                         ("controlnet_single_block_samples", controlnet_single_block_samples),
                                         ("additional_t_cond", additional_t_cond)) if value is not None]
        if controlnet_blocks_repeat:
            bad.append("controlnet_blocks_repeat")
        if bad:
            raise NotImplementedError(f"MMDiT does not support {', '.join(bad)} (diffusers extras outside the "
                                      "editing trainer)")
