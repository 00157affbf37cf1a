"""Read and write diffusers-format transformer folders with `safetensors` alone (no diffusers import).

A folder holds `config.json` and either `diffusion_pytorch_model.safetensors` or shards listed in
`diffusion_pytorch_model.safetensors.index.json` (`{"metadata": {"total_size": n}, "weight_map": {key: file}}`).

`key_map(config)` is the single source of truth for names: each nftcore parameter maps to one diffusers tensor, or
to several stacked along dim 0 (the fused QKV projections). Loading concatenates while reading, saving slices them
apart again, and the same table yields the expected diffusers keys and shapes for validation.

Memory: the model is built on the meta device; every tensor is validated from the file headers first (keys, shapes,
dtypes; no tensor data read), then each nftcore parameter is allocated once in its final dtype/device and its
diffusers parts are copied into it one by one, straight from the memory-mapped file; each shard is unmapped after
its last tensor. A 20 B model therefore never exists twice, and no state dict of the whole model is ever built.
Saving holds one output file's tensors at a time, gathering FSDP2-sharded parameters one by one as their file fills.

See docs/ALGORITHM.md §6 (the base models); full fine-tuning exports the EMA in this format (§5.5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MMDiTConfig

if TYPE_CHECKING:
    from .mmdit import MMDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_SHOW = 8  # offending keys listed in an error message before "... and N more"

# nftcore name -> [(diffusers name, rows)]: one entry is a rename, several are stacked along dim 0.
KeyMap = dict[str, list[tuple[str, int]]]


def _listing(keys, show: int = _SHOW) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:show])
    return f"{len(keys)} key(s): {head}" + (f", ... and {len(keys) - show} more" if len(keys) > show else "")


def _linear(ours: str, theirs: str | list[str], rows: int | list[int]) -> KeyMap:
    """weight and bias of one nftcore Linear from one or several diffusers Linears of `rows` outputs each."""
    theirs = [theirs] if isinstance(theirs, str) else theirs
    rows = [rows] * len(theirs) if isinstance(rows, int) else rows
    return {f"{ours}.{p}": [(f"{t}.{p}", r) for t, r in zip(theirs, rows)] for p in ("weight", "bias")}


def key_map(cfg: MMDiTConfig) -> KeyMap:
    """Every nftcore parameter of a model with config `cfg` and where it lives in the diffusers checkpoint."""
    c, d, m = cfg.hidden_size, cfg.attention_head_dim, cfg.mlp_hidden_dim
    out: KeyMap = {}
    flux = cfg.family == "flux"
    # top level
    out |= _linear("img_in", "x_embedder" if flux else "img_in", c)
    out |= _linear("txt_in", "context_embedder" if flux else "txt_in", c)
    out |= _linear("cond.time_in.fc1", "time_text_embed.timestep_embedder.linear_1", c)
    out |= _linear("cond.time_in.fc2", "time_text_embed.timestep_embedder.linear_2", c)
    if flux:
        if cfg.guidance_embeds:
            out |= _linear("cond.guidance_in.fc1", "time_text_embed.guidance_embedder.linear_1", c)
            out |= _linear("cond.guidance_in.fc2", "time_text_embed.guidance_embedder.linear_2", c)
        out |= _linear("cond.vector_in.fc1", "time_text_embed.text_embedder.linear_1", c)
        out |= _linear("cond.vector_in.fc2", "time_text_embed.text_embedder.linear_2", c)
    else:
        out["txt_norm"] = [("txt_norm.weight", cfg.joint_attention_dim)]
    out |= _linear("final_mod", "norm_out.linear", 2 * c)
    out |= _linear("final_proj", "proj_out", cfg.out_features)
    # double-stream blocks
    for i in range(cfg.num_layers):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        a = f"{theirs}.attn"
        img_mod, txt_mod = (f"{theirs}.norm1.linear", f"{theirs}.norm1_context.linear") if flux else (
            f"{theirs}.img_mod.1", f"{theirs}.txt_mod.1")
        img_mlp, txt_mlp = (f"{theirs}.ff", f"{theirs}.ff_context") if flux else (
            f"{theirs}.img_mlp", f"{theirs}.txt_mlp")
        out |= _linear(f"{ours}.img_mod", img_mod, 6 * c)
        out |= _linear(f"{ours}.txt_mod", txt_mod, 6 * c)
        out |= _linear(f"{ours}.img_qkv", [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], c)
        out |= _linear(f"{ours}.txt_qkv", [f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj"], c)
        for stream, norm in (("img_q", "norm_q"), ("img_k", "norm_k"), ("txt_q", "norm_added_q"),
                             ("txt_k", "norm_added_k")):
            out[f"{ours}.{stream}_norm"] = [(f"{a}.{norm}.weight", d)]
        out |= _linear(f"{ours}.img_out", f"{a}.to_out.0", c)
        out |= _linear(f"{ours}.txt_out", f"{a}.to_add_out", c)
        for stream, mlp in (("img", img_mlp), ("txt", txt_mlp)):
            out |= _linear(f"{ours}.{stream}_mlp.fc1", f"{mlp}.net.0.proj", m)
            out |= _linear(f"{ours}.{stream}_mlp.fc2", f"{mlp}.net.2", c)
    # single-stream blocks (FLUX)
    for i in range(cfg.num_single_layers):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        a = f"{theirs}.attn"
        out |= _linear(f"{ours}.mod", f"{theirs}.norm.linear", 3 * c)
        out |= _linear(f"{ours}.qkv", [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], c)
        out |= _linear(f"{ours}.mlp_in", f"{theirs}.proj_mlp", m)
        out[f"{ours}.q_norm"] = [(f"{a}.norm_q.weight", d)]
        out[f"{ours}.k_norm"] = [(f"{a}.norm_k.weight", d)]
        out |= _linear(f"{ours}.out", f"{theirs}.proj_out", c)
    return out


def _diffusers_shapes(model: "MMDiT", kmap: KeyMap) -> dict[str, tuple[int, ...]]:
    """Expected shape of every diffusers tensor, from the (meta) model's parameter shapes and the row split."""
    params = dict(model.named_parameters())
    shapes = {}
    for ours, parts in kmap.items():
        tail = tuple(params[ours].shape[1:])
        for theirs, rows in parts:
            shapes[theirs] = (rows, *tail)
    return shapes


# -------------------------------------------------------------------------------------------------------- loading

def read_config(folder: Path) -> MMDiTConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME}; expected a diffusers transformer folder")
    return MMDiTConfig.from_diffusers(json.loads(path.read_text()))


def _weight_files(folder: Path) -> dict[str, Path]:
    """diffusers key -> file holding it, from the index (sharded) or the single weights file."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no `weight_map` object")
        missing_files = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing_files:
            lost = [k for k, f in weight_map.items() if f in missing_files]
            raise ValueError(f"{folder}: missing shard file(s) {', '.join(missing_files)} listed in {INDEX_NAME}; "
                             f"they hold {_listing(lost)}")
        located = {}
        for name in sorted(set(weight_map.values())):
            with safe_open(folder / name, framework="pt") as f:
                present = set(f.keys())
            claimed = {k for k, v in weight_map.items() if v == name}
            if claimed - present:
                raise ValueError(f"{folder / name}: {INDEX_NAME} lists tensors the shard lacks: "
                                 f"{_listing(claimed - present)}")
            located |= {k: folder / name for k in claimed}
        return located
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise ValueError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_pretrained(cls: type["MMDiT"], folder: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> "MMDiT":
    """Build `cls` from a diffusers transformer folder.

    dtype: parameter dtype (None keeps the checkpoint's dtype, per tensor). device: where the parameters live.
    Raises ValueError, listing the offending keys, on an unknown `_class_name`, an unsupported config flag, a missing
    shard, missing or unexpected tensors, or a shape mismatch - all before any tensor data is read.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = cls(cfg)
    kmap = key_map(cfg)
    expected = _diffusers_shapes(model, kmap)
    files = _weight_files(folder)

    missing, unexpected = expected.keys() - files.keys(), files.keys() - expected.keys()
    if missing or unexpected:
        msg = [f"{folder}: checkpoint does not match a {cfg.class_name} with this config.json"]
        if missing:
            msg.append(f"missing {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected {_listing(unexpected)}")
        raise ValueError("; ".join(msg))

    wrong, dtypes = [], {}
    for path in sorted(set(files.values())):  # headers only: no tensor data is touched here
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in (k for k, p in files.items() if p == path):
                view = f.get_slice(key)
                dtypes[key] = view.get_dtype()
                if tuple(view.get_shape()) != expected[key]:
                    wrong.append(f"{key} {list(view.get_shape())} != expected {list(expected[key])}")
    if wrong:
        raise ValueError(f"{folder}: shape mismatch in {len(wrong)} tensor(s): " + "; ".join(sorted(wrong)[:_SHOW])
                         + (f"; ... and {len(wrong) - _SHOW} more" if len(wrong) > _SHOW else ""))

    # Each shard is mapped while its tensors are copied and closed after its last use, so only a shard or two are
    # mapped (and paged in) at a time.
    order = list(kmap.items())
    last_use = {files[theirs]: i for i, (_, parts) in enumerate(order) for theirs, _ in parts}
    params = dict(model.named_parameters())
    handles = {}  # path -> open safe_open handle
    try:
        for i, (ours, parts) in enumerate(order):
            value = torch.empty(params[ours].shape, dtype=dtype or _safetensors_dtype(dtypes[parts[0][0]]),
                                device=device)
            row = 0
            for theirs, rows in parts:  # copy each diffusers tensor into its rows; one part in memory at a time
                path = files[theirs]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt", device="cpu").__enter__()
                value[row:row + rows].copy_(handles[path].get_tensor(theirs))
                row += rows
            _assign(model, ours, value)
            for path in [p for p in handles if last_use[p] == i]:
                handles.pop(path).__exit__(None, None, None)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return model


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_dtype(name: str) -> torch.dtype:
    if name not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return _ST_DTYPES[name]


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter `name` by `value` without copying it."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = owner._parameters[leaf]
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)


# --------------------------------------------------------------------------------------------------------- saving

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '500MB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def diffusers_state_dict(model: "MMDiT", params: Mapping[str, torch.Tensor] | None = None):
    """Yield (diffusers key, tensor view) pairs in key-map order; fused parameters come out as row slices (views,
    no copy). `params` (our names → full tensors, e.g. a gathered FSDP2 state dict) replaces the model's own."""
    params = dict(model.named_parameters()) if params is None else params
    for ours, parts in key_map(model.config).items():
        yield from _split(ours, params[ours].detach(), parts)


def _split(ours: str, value: torch.Tensor, parts: list[tuple[str, int]]):
    row = 0
    for theirs, rows in parts:
        yield theirs, value[row:row + rows]
        row += rows


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: an FSDP2 shard (DTensor) is all-gathered, a plain tensor is itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _files(kmap: KeyMap, params: Mapping[str, torch.Tensor], limit: int, dtype: torch.dtype | None) -> list[list[str]]:
    """Our parameter names grouped into files of at most `limit` bytes (a fused parameter's parts stay in one file),
    planned from the (global) shapes alone, so nothing is gathered to plan."""
    files: list[list[str]] = [[]]
    size = 0
    for ours in kmap:
        p = params[ours]
        nbytes = p.numel() * (dtype or p.dtype).itemsize
        if files[-1] and size + nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(ours)
        size += nbytes
    return files


def save_pretrained(model: "MMDiT", folder: str | Path, *, max_shard_size: int | str = "10GB",
                    params: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                    write: bool = True) -> None:
    """Write `config.json` and the weights in diffusers' layout and names (QKV un-fused), sharded when the total
    exceeds `max_shard_size` (diffusers' file names and index format). `params`: the weights to write instead of the
    model's own (our names); `dtype`: the dtype written (default: each tensor's own).

    One file's tensors at a time are on the CPU. FSDP2 shards (DTensors) are gathered one parameter at a time while
    their file is filled: a collective, so every rank calls this with the same model and `write=False` on all but
    one, which runs the same gathers and writes nothing."""
    folder = Path(folder)
    params = dict(model.named_parameters()) if params is None else params
    kmap = key_map(model.config)
    files = _files(kmap, params, _parse_size(max_shard_size), dtype)
    names = [WEIGHTS_NAME] if len(files) == 1 else [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        stale = [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("diffusion_pytorch_model-*.safetensors")]
        for path in stale:
            path.unlink(missing_ok=True)  # a previous save with another sharding must not leave files behind
    weight_map, total = {}, 0
    for name, group in zip(names, files):
        shard = {}
        for ours in group:
            value = _whole(params[ours].detach()).to("cpu", dtype or params[ours].dtype)
            shard |= {k: t.contiguous() for k, t in _split(ours, value, kmap[ours])}
        if write:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard  # this file's tensors are written: free them before gathering the next file's
    if not write:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_diffusers(), indent=2, sort_keys=True) + "\n")
