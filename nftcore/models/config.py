"""`MMDiTConfig`: one dataclass that describes both transformer families, read from and written to a diffusers
`config.json`.

Why the field names are diffusers' own: a diffusers pipeline reads `transformer.config.in_channels` and
`transformer.config.guidance_embeds`, and a config round-trips to `config.json` with no renaming table. The only
field of ours is `family`, which diffusers encodes as `_class_name`.

Why unknown keys and unsupported flags are rejected: newer diffusers versions grow switches (Qwen-Image `zero_cond_t`,
`use_additional_t_cond`, `use_layer3d_rope`) that change the math. Loading such a checkpoint into a model that
silently ignores them would train a different network, so every key is either understood, known to be ignored by
diffusers itself, or an error that names it.

See docs/ALGORITHM.md §6.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["flux", "qwen_image"]

# family <-> diffusers class (`_class_name` in config.json)
CLASS_NAMES: dict[str, str] = {"flux": "FluxTransformer2DModel", "qwen_image": "QwenImageTransformer2DModel"}
FAMILIES: dict[str, str] = {v: k for k, v in CLASS_NAMES.items()}
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose model code this package matches numerically

# diffusers' constructor defaults per family (diffusers 0.42.1): a key left out of config.json takes these.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flux": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    "qwen_image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                       axes_dims_rope=(16, 56, 56)),
}
# Flags diffusers knows and nftcore does not implement: accepted only at the value given here (diffusers' default).
_UNSUPPORTED: dict[str, dict[str, Any]] = {
    "flux": {},
    "qwen_image": dict(zero_cond_t=False, use_additional_t_cond=False, use_layer3d_rope=False,
                       # diffusers 0.42 builds no guidance embedder for Qwen-Image and its forward fails when given
                       # guidance; a checkpoint that says True expects something neither implementation does.
                       guidance_embeds=False),
}
# Keys that real checkpoints carry but diffusers' constructor ignores (Qwen-Image's config.json lists a
# `pooled_projection_dim` the model never uses).
_IGNORED: dict[str, frozenset[str]] = {"flux": frozenset(), "qwen_image": frozenset({"pooled_projection_dim"})}


@dataclass(frozen=True, kw_only=True)
class MMDiTConfig:
    """Architecture of one MMDiT. Field names and meanings are diffusers' (FluxTransformer2DModel /
    QwenImageTransformer2DModel constructor arguments)."""

    family: Family
    """"flux" (FLUX.1 / Kontext: guidance + pooled-text modulation, single-stream blocks, id-based RoPE) or
    "qwen_image" (Qwen-Image(-Edit): timestep-only modulation, text RMSNorm, MSRoPE)."""
    patch_size: int
    """Latent patch edge; only sizes the output projection (inputs arrive already packed)."""
    in_channels: int
    """Channels per packed input token (16 latent channels x 2 x 2 patch = 64)."""
    out_channels: int
    """Latent channels per output patch position; the projection emits patch_size**2 * out_channels per token."""
    num_layers: int
    """Dual-stream (MMDiT) blocks."""
    num_single_layers: int = 0
    """Single-stream blocks with the parallel MLP (FLUX only)."""
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    """Width of the text encoder's hidden states (T5-XXL 4096, Qwen2.5-VL 3584)."""
    pooled_projection_dim: int = 0
    """Width of the pooled CLIP embedding (FLUX only; 0 for Qwen-Image)."""
    guidance_embeds: bool = False
    """FLUX: add a distilled-guidance embedding to the modulation vector."""
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    """RoPE dims per position axis (frame/index, row, column); they sum to attention_head_dim."""
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm in both families."""

    def __post_init__(self):
        if self.family not in CLASS_NAMES:
            raise ValueError(f"MMDiTConfig: unknown family {self.family!r}; expected one of {sorted(CLASS_NAMES)}")
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        problems = []
        if len(self.axes_dims_rope) != 3 or any(a % 2 for a in self.axes_dims_rope):
            problems.append(f"axes_dims_rope {self.axes_dims_rope} must be three even numbers")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                            f"{self.attention_head_dim}")
        if self.family == "qwen_image" and self.num_single_layers:
            problems.append("qwen_image has no single-stream blocks (num_single_layers must be 0)")
        if self.family == "flux" and self.pooled_projection_dim <= 0:
            problems.append("flux needs pooled_projection_dim > 0")
        if self.family == "qwen_image" and self.guidance_embeds:
            problems.append("qwen_image with guidance_embeds=True is not supported (diffusers builds no guidance "
                            "embedder for it)")
        if problems:
            raise ValueError("MMDiTConfig: " + "; ".join(problems))

    # ---------------------------------------------------------------------------------------------- derived sizes

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_features(self) -> int:
        """Width of each output token: patch_size**2 * out_channels (64 for both real models)."""
        return self.patch_size * self.patch_size * self.out_channels

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.family]

    # ------------------------------------------------------------------------------------------ diffusers config

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any]) -> "MMDiTConfig":
        """Parse a diffusers transformer `config.json` dict; ValueError names every key nftcore cannot honour."""
        class_name = raw.get("_class_name")
        if class_name not in FAMILIES:
            raise ValueError(f"config.json: unsupported `_class_name` {class_name!r}; nftcore reads "
                             f"{sorted(FAMILIES)}")
        family = FAMILIES[class_name]
        known, unsupported, ignored = _DEFAULTS[family], _UNSUPPORTED[family], _IGNORED[family]
        values = dict(known)
        unknown, bad_flags = [], []
        for key, value in raw.items():
            if key.startswith("_") or key in ignored:
                continue  # diffusers' bookkeeping (_class_name, _diffusers_version, _name_or_path) or a dead key
            if key in unsupported:
                if value != unsupported[key]:
                    bad_flags.append(f"{key}={value!r}")
                if key in known:
                    values[key] = value
            elif key in known:
                values[key] = value
            else:
                unknown.append(key)
        if bad_flags or unknown:
            parts = []
            if bad_flags:
                supported = ", ".join(f"{k}={v!r}" for k, v in unsupported.items())
                parts.append(f"unsupported setting(s) {', '.join(bad_flags)} (nftcore implements only {supported})")
            if unknown:
                parts.append(f"unknown key(s) {', '.join(sorted(unknown))}")
            raise ValueError(f"config.json ({class_name}): " + "; ".join(parts))
        if values.get("out_channels") is None:
            values["out_channels"] = values["in_channels"]  # diffusers: `out_channels or in_channels`
        if family == "flux":
            return cls(family=family, **values)
        return cls(family=family, num_single_layers=0, pooled_projection_dim=0, **values)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' `from_pretrained` rebuilds this architecture from."""
        keys = _DEFAULTS[self.family]
        out: dict[str, Any] = {"_class_name": self.class_name, "_diffusers_version": DIFFUSERS_VERSION}
        for key in sorted(keys):
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        out.update({k: v for k, v in _UNSUPPORTED[self.family].items() if k not in keys})
        return out

    def replace(self, **changes: Any) -> "MMDiTConfig":
        return dataclasses.replace(self, **changes)
