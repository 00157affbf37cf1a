"""The demo policy: a tiny MMDiT of the FLUX family in pixel-patch space, with a tiny text encoder of its own.

The embedded demo needs a policy that has the shape of the real one (FLUX.1-Kontext: an MMDiT that denoises target
tokens with the source image's tokens appended, conditioned on per-token text embeddings and a pooled embedding)
while being small enough to pretrain, sample and RL-train on two CPU cores in minutes. So:

- No VAE. The "latents" are the image itself: [0, 1] pixels mapped to [-1, 1] and cut into p × p patches
  (`pack_images`), as FLUX packs 2 × 2 latent patches: 16 tokens × 48 channels for the demo's 16 px images, p = 4.
- Why 16 px and not the world's default 32: cost is what decides whether RL visibly learns in minutes. At 32 px
  (64 target + 64 source tokens) every forward costs ≈ 3× more (a rollout of 16 edits × 6 steps: 0.70 s against
  0.23 s), so the same pretraining wall time reaches a clearly weaker base and an RL run gets a third of the epochs.
  The world, the verifier and this policy all work at either size (`DemoConfig.image_size`); the trainer must build
  its `DemoDataset` at `policy.demo.image_size`.
- The transformer is nftcore's own `MMDiT` with a FLUX config of ≈ 0.5 M parameters (`default_transformer_config`),
  driven through `nftcore.models.edit_velocity_fn` and `FluxEditConditioning` exactly like the real model, so the
  trainer's code path (conditioning once, `velocity_fn(x, sigma)`, LoRA adapters "default"/"old"/disabled) is the
  real one.
- The text encoder (`DemoTextEncoder`) is word embeddings + positions + one pre-norm transformer layer over the demo
  grammar's vocabulary. It is trained jointly in pretraining and frozen in RL (conditioning is computed once per
  sample under no_grad, as the real trainer does with T5/CLIP).

Sampling uses `nftcore.sampling` on FLUX's own shifted grid at the demo's target token count (`flux_sigmas(n, 16)`,
mu ≈ 0.46: a mild pull of the few steps towards high noise). With an earlier, less trained base model the uniform
grid scored the same within ±0.01 at 4, 6, 8 and 12 steps (dpm2 and euler), and at 32 px the shifted grid was ≈ 0.03
better at 4–8 steps, so the family's schedule it is: the training timesteps then come from the same function as in
the real recipes. Everything is float32.

One checkpoint file: `save`/`load` write a single safetensors file whose metadata header holds the config as JSON
(`"nftcore.demo"` key) and whose tensors are `transformer.*` + `text_encoder.*`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nftcore.demo.world import MAX_TOKENS, PAD_ID, VOCAB, tokenize_batch
from nftcore.models import MMDiT, MMDiTConfig
from nftcore.models.editing import FluxEditConditioning, VelocityFn, edit_velocity_fn
from nftcore.sampling import flux_sigmas
from nftcore.sampling import sample as solve

ASSET = Path(__file__).with_name("assets") / "demo_base.safetensors"
"""The shipped base checkpoint (`python -m nftcore.demo.pretrain` reproduces it)."""
METADATA_KEY = "nftcore.demo"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------------------------
# Pixel patches: the demo's latents


def pack_images(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, (H/p)·(W/p), 3·p·p] in [-1, 1], row-major tokens, channels (c, py, px)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {patch}")
    x = images * 2.0 - 1.0
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_images(tokens: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_images`: [B, rows·cols, 3·p·p] in [-1, 1] -> [B, 3, rows·p, cols·p] in [0, 1] (unclamped)."""
    rows, cols = grid
    b, n, d = tokens.shape
    if n != rows * cols or d != 3 * patch * patch:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match a {rows}×{cols} grid of {patch}-px patches")
    x = tokens.reshape(b, rows, cols, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return (x.reshape(b, 3, rows * patch, cols * patch) + 1.0) * 0.5


def select_conditioning(cond: FluxEditConditioning,
                        index: slice | torch.Tensor | Sequence[int]) -> FluxEditConditioning:
    """The conditioning of a sub-batch (a micro-batch, the survivors of a filter, K repeats of each prompt via
    `repeat_interleave` indices). Per-sample tensors are indexed; ids and batch-1 tensors are shared as they are."""

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or x.shape[0] == 1:
            return x
        return x[index] if isinstance(index, slice) else x[torch.as_tensor(index, device=x.device)]

    return dataclasses.replace(cond, prompt_embeds=pick(cond.prompt_embeds),
                               pooled_prompt_embeds=pick(cond.pooled_prompt_embeds),
                               source_latents=pick(cond.source_latents))


# ----------------------------------------------------------------------------------------------------------------
# Text encoder


class _TextLayer(nn.Module):
    """Pre-norm transformer layer (self-attention + GELU MLP) with a key padding mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # pads are never keys
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DemoTextEncoder(nn.Module):
    """Word ids [B, L] + mask -> (prompt_embeds [B, L, joint_dim], pooled [B, pooled_dim]).

    The colour words play two roles in "make the red circle blue", so position matters: learned position embeddings,
    then `layers` transformer layers. Padding never influences a real token (masked keys), padded rows of
    `prompt_embeds` are zeroed (FLUX attends to every text token, so they must carry nothing that depends on the
    pad id's embedding), and `pooled` is the masked mean of real tokens, projected.
    """

    def __init__(self, *, vocab_size: int = len(VOCAB), max_tokens: int = MAX_TOKENS, width: int = 64, layers: int = 1,
                 heads: int = 2, joint_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.layers = nn.ModuleList(_TextLayer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.to_joint = nn.Linear(width, joint_dim)
        self.to_pooled = nn.Linear(width, pooled_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 2 or ids.shape[1] > self.max_tokens:
            raise ValueError(f"ids must be [B, L ≤ {self.max_tokens}], got {tuple(ids.shape)}")
        mask = (ids != PAD_ID) if mask is None else mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every instruction needs at least one real token")
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1)
        return self.to_joint(x) * m, self.to_pooled(pooled)


# ----------------------------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class DemoConfig:
    """Everything but the transformer's own config (which is an `MMDiTConfig`)."""

    image_size: int = 16
    patch: int = 4
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    schedule: str = "flux"
    """Sigma grid of `DemoPolicy.sigmas`: "uniform" (linspace(1, 0, N + 1)) or "flux" (FLUX's exponential shift at the
    demo's target token count)."""

    def __post_init__(self):
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch {self.patch}")
        if self.schedule not in ("uniform", "flux"):
            raise ValueError(f"schedule must be 'uniform' or 'flux', got {self.schedule!r}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def channels(self) -> int:
        return 3 * self.patch * self.patch


def default_transformer_config(demo: DemoConfig = DemoConfig(), *, heads: int = 2, head_dim: int = 32,
                               double: int = 2, single: int = 2) -> MMDiTConfig:
    """A FLUX MMDiT sized for the demo: 2 heads × 32 = 64 wide, 2 double + 2 single blocks, no guidance embedding,
    patch_size 1 (tokens arrive packed; the projection emits one 48-channel patch per token).

    RoPE axes (4, 14, 14): the image-index axis (target 0, source 1) needs one frequency pair to tell the two images
    apart, so the rest goes to rows and columns, where the target-to-source copy that every edit builds on needs
    sharp positional attention (FLUX's own split, 16/56/56 of 128, has the same shape)."""
    side = (head_dim - 4) // 2 // 2 * 2
    axes = (head_dim - 2 * side, side, side)
    return MMDiTConfig(family="flux", patch_size=1, in_channels=demo.channels, out_channels=demo.channels,
                       num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
                       num_attention_heads=heads, joint_attention_dim=demo.text_width,
                       pooled_projection_dim=demo.text_width, guidance_embeds=False, axes_dims_rope=axes)


class DemoPolicy(nn.Module):
    """`transformer` (an `MMDiT`, where LoRA goes) + `text_encoder` (`DemoTextEncoder`), and the editing API the
    trainer uses: `conditioning` once per sample, `velocity_fn(cond)(x, sigma)`, `sample`, `decode`."""

    def __init__(self, demo: DemoConfig | None = None, transformer: MMDiTConfig | None = None):
        super().__init__()
        self.demo = demo or DemoConfig()
        config = transformer or default_transformer_config(self.demo)
        if config.family != "flux" or config.in_channels != self.demo.channels or config.guidance_embeds:
            raise ValueError(f"the demo needs a FLUX MMDiT with in_channels {self.demo.channels} and no guidance "
                             f"embedding, got {config}")
        if config.joint_attention_dim != self.demo.text_width or config.pooled_projection_dim != self.demo.text_width:
            raise ValueError("joint_attention_dim and pooled_projection_dim must equal the text encoder width "
                             f"{self.demo.text_width}")
        self.transformer = MMDiT(config)
        self.text_encoder = DemoTextEncoder(width=self.demo.text_width, layers=self.demo.text_layers,
                                            heads=self.demo.text_heads, joint_dim=self.demo.text_width,
                                            pooled_dim=self.demo.text_width)

    @classmethod
    def fresh(cls, seed: int, demo: DemoConfig | None = None, transformer: MMDiTConfig | None = None) -> "DemoPolicy":
        """A randomly initialised policy, deterministic in `seed`, with DiT's adaLN-Zero init for training from
        scratch: every modulation and the output projection start at zero, so each block starts as the identity and
        the first prediction is 0 (what keeps the first steps at pretraining's high learning rate tame)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = cls(demo, transformer)
        t = policy.transformer
        zero = [t.final_mod, t.final_proj]
        zero += [m for block in t.double_blocks for m in (block.img_mod, block.txt_mod)]
        zero += [block.mod for block in t.single_blocks]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return policy

    # ------------------------------------------------------------------------------------------------- latents

    @property
    def grid(self) -> tuple[int, int]:
        return self.demo.grid

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(tokens, channels) of one packed image: (16, 48) at 16 px with 4-px patches."""
        return self.demo.tokens, self.demo.channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> packed latents [B, N, C] in [-1, 1]."""
        if images.shape[-2:] != (self.demo.image_size,) * 2:
            raise ValueError(f"the demo policy works at {self.demo.image_size} px, got {tuple(images.shape)}")
        return pack_images(images.to(self.transformer.dtype), self.demo.patch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, N, C] -> images [B, 3, H, W] clamped to [0, 1]."""
        return unpack_images(latents.float(), self.demo.patch, self.grid).clamp(0.0, 1.0)

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal starting latents [batch, N, C] (on the CPU generator's device)."""
        return torch.randn(batch, *self.latent_shape, generator=generator, dtype=self.transformer.dtype)

    # -------------------------------------------------------------------------------------------- conditioning

    def encode_text(self, instructions: Sequence[str] | tuple[torch.Tensor, torch.Tensor]):
        """(prompt_embeds [B, L, joint], pooled [B, pooled]) for instruction strings or (ids, mask)."""
        if isinstance(instructions, tuple) and len(instructions) == 2 and isinstance(instructions[0], torch.Tensor):
            ids, mask = instructions
        else:
            ids, mask = tokenize_batch(list(instructions))
        device = self.transformer.device
        return self.text_encoder(ids.to(device), mask.to(device))

    def conditioning(self, source_images: torch.Tensor, instructions, *, grad: bool = False) -> FluxEditConditioning:
        """Kontext-style conditioning for a batch of edits: source tokens (index 1 ids), text embeddings, no guidance.

        Computed once per sample and reused for every sampler step and training timestep; without `grad` (RL) it is
        built under no_grad, so the text encoder is frozen by construction. Pretraining passes grad=True.
        """
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            prompt_embeds, pooled = self.encode_text(instructions)
            source = self.encode(source_images.to(self.transformer.device))
        if source.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"{source.shape[0]} source images for {prompt_embeds.shape[0]} instructions")
        return FluxEditConditioning.from_grids(prompt_embeds, pooled, self.grid, source, self.grid, guidance=None)

    def velocity_fn(self, cond: FluxEditConditioning) -> VelocityFn:
        """`velocity_fn(x [B, N, C], sigma) -> v [B, N, C]` over the target tokens, through whatever LoRA adapter
        is active on `self.transformer` when it is called."""
        return edit_velocity_fn(self.transformer, cond)

    # ------------------------------------------------------------------------------------------------ sampling

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The sampler's sigma grid (float64, num_steps + 1 values from 1 to 0): training noises at these too."""
        if self.demo.schedule == "flux":
            return flux_sigmas(num_steps, self.demo.tokens)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    @torch.no_grad()
    def sample(self, cond: FluxEditConditioning, noise: torch.Tensor, num_steps: int = 6, solver: str = "dpm2",
               *, return_trajectory: bool = False):
        """Clean packed latents [B, N, C] from `noise` (or (latents, Trajectory)), deterministic given the noise."""
        return solve(self.velocity_fn(cond), noise, self.sigmas(num_steps), solver=solver,
                     return_trajectory=return_trajectory)

    @torch.no_grad()
    def edit(self, source_images: torch.Tensor, instructions, *, generator: torch.Generator | None = None,
             num_steps: int = 6, solver: str = "dpm2") -> torch.Tensor:
        """Convenience: edited images [B, 3, H, W] in [0, 1] for sources and instructions."""
        cond = self.conditioning(source_images, instructions)
        return self.decode(self.sample(cond, self.noise(source_images.shape[0], generator), num_steps, solver))

    # ---------------------------------------------------------------------------------------------------- I/O

    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "demo": dataclasses.asdict(self.demo),
                "transformer": self.transformer.config.to_diffusers()}

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """All base weights (LoRA adapter tensors excluded: those are saved with `nftcore.models.lora_io`)."""
        return {k: v for k, v in self.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """One safetensors file: every base weight, and the config JSON under the `"nftcore.demo"` metadata key."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.base_state_dict().items()}
        metadata = {METADATA_KEY: json.dumps(self.config_dict(), sort_keys=True), **(extra_metadata or {})}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> "DemoPolicy":
        """Rebuild the policy from a file written by `save` (strict: every tensor must match)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not a demo policy checkpoint")
        config = json.loads(raw)
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: demo checkpoint format {config.get('format')!r}, expected {FORMAT_VERSION}")
        policy = cls(DemoConfig(**config["demo"]), MMDiTConfig.from_diffusers(config["transformer"]))
        policy.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        return policy.to(device).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: torch.device | str = "cpu") -> "DemoPolicy":
        """The shipped base model (`nftcore/demo/assets/demo_base.safetensors`), or the checkpoint at `path`."""
        path = ASSET if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no demo checkpoint at {path}; make one with `python -m nftcore.demo.pretrain "
                                    f"--out {path}`")
        return cls.load(path, device=device)

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in module.parameters())
                for name, module in (("transformer", self.transformer), ("text_encoder", self.text_encoder))}

