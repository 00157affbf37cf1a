"""The conditioning cache (`data.cache_conditioning`): each dataset row's frozen-encoder output, computed once.

The encoders are frozen, so a row's conditioning (text embeddings, pooled vector, packed source latents) is the same
in every epoch and every evaluation (§11.15). The modes ('memory': host RAM per rank; 'disk': one verified
safetensors file per row), what makes an entry stale or corrupt, and precomputing the cache are in
docs/TRAINING.md, "Cached conditioning". A lookup for a batch of samples:

1. finds each distinct row once (a group's K samples share one row, so K samples cost one lookup and at most one
   encoder row);
2. encodes the distinct rows that are not cached in ONE call of `family.conditioning`, splits the result per row
   (`index_conditioning`) and stores each row's batch-1 conditioning;
3. assembles the batch in the samples' order (`cat_conditioning`, then `index_conditioning`) on the run's device.

An entry file is `<key>.safetensors` in the cache folder, key = hash(encoder identity, sample id, instruction), so
a start-up check can find every row's file without decoding a single image. Its header metadata holds the identity
(family, resolved model folder and a fingerprint of its encoder files, model.dtype, the text lengths, guidance,
resolution), a hash of the row's content as encoded (instruction + the source pixels after the dataset's crop and
resize, checked against the sample at every use), the non-tensor fields as JSON, and a checksum over the tensors
and all of these.
An entry is used only when all of these agree and its shapes fit the run's token grid; otherwise it is stale or
corrupt: warned about once with its file name, recomputed and rewritten. Files are written to a temporary name and
renamed (`os.replace`), so a killed process or two ranks writing the same row never leave a partial file under an
entry's name; a torn write that still reached the disk fails its checksum.

With sharded text encoders (`parallel.shard_text_encoder`) each lookup agrees over ranks whether anyone has a miss,
and a rank without one encodes one row it drops, so every rank calls the encoder (a collective) equally often.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nftcore.family import cat_conditioning, index_conditioning
from nftcore.models.editing import FluxEditConditioning, QwenEditConditioning
from nftcore.trainer.distributed import DistEnv, all_reduce_max

FORMAT = "nftcore-conditioning/1"
"""Written into every entry and into the identity: a change of the entry layout invalidates old entries."""
SUFFIX = ".safetensors"
MAX_HEADER = 16 << 20  # a header length beyond this is a damaged length field, not a header
MODES = ("off", "memory", "disk")
TYPES = {cls.__name__: cls for cls in (FluxEditConditioning, QwenEditConditioning)}


class EntryProblem(Exception):
    """An entry file that must not be used: `kind` is 'stale' (made for other encoders or other content) or
    'corrupt' (unreadable, bad header, checksum mismatch, wrong shapes)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


# ---------------------------------------------------------------------------------------------------- keys


def canonical(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def _hash(*parts: bytes | str, size: int = 16) -> str:
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def entry_key(identity: dict[str, Any], sample_id: str, prompt: str) -> str:
    """The entry's file stem: the encoders' identity and the row's id and instruction (no pixels: a start-up check
    finds every row's entry from the metadata alone; the pixels are checked at use, see `content_hash`)."""
    return _hash(canonical(identity), sample_id, prompt)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def content_hash(sample: Any) -> str:
    """What the encoders see of a row: its instruction and its source image's pixels as the dataset hands them out
    (after the crop and resize; a PIL image or a [3, H, W] tensor)."""
    image = sample.image
    if torch.is_tensor(image):
        pixels = [str(image.dtype), str(tuple(image.shape)), _tensor_bytes(image)]
    else:
        pixels = [image.mode, str(image.size), image.tobytes()]
    return _hash(sample.prompt, *pixels)


def directory_of(cfg) -> Path:
    """`data.cache_dir`, or OUT/conditioning_cache when it is empty."""
    return Path(cfg.data.cache_dir or Path(cfg.run.out) / "conditioning_cache").expanduser()


def identity_of(family) -> dict[str, Any]:
    """The family's encoder identity plus the entry format; a family without `conditioning_identity()` (a test's
    own) is known by its class name, which is enough within one process ('memory')."""
    own = family.conditioning_identity() if hasattr(family, "conditioning_identity") else {
        "family": type(family).__name__}
    return {**own, "format": FORMAT}


# ---------------------------------------------------------------------------------------------------- entry files


def _split_fields(cond) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, values = {}, {}
    for f in dataclasses.fields(cond):
        value = getattr(cond, f.name)
        if torch.is_tensor(value):
            tensors[f.name] = value
        else:
            values[f.name] = value
    return tensors, values


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Over every tensor (name, dtype, shape, bytes) and every other metadata item: any damage that still parses
    changes it."""
    parts: list[bytes | str] = [json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True)]
    for name in sorted(tensors):
        t = tensors[name]
        parts += [name, str(t.dtype), str(tuple(t.shape)), _tensor_bytes(t)]
    return _hash(*parts)


def encode_entry(cond, identity: dict[str, Any], content: str, sample_id: str) -> bytes:
    """A batch-1 conditioning as safetensors bytes (tensors + metadata: identity, content, fields, checksum)."""
    from safetensors.torch import save

    tensors, values = _split_fields(cond)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "identity": canonical(identity), "type": type(cond).__name__,
                "fields": json.dumps(values, sort_keys=True), "content": content, "sample_id": sample_id}
    return save(tensors, metadata={**metadata, "checksum": _checksum(tensors, metadata)})


def read_header(path: Path, data: bytes | None = None) -> dict[str, str]:
    """The metadata of an entry file (reads only the header unless `data` is given); EntryProblem('corrupt')."""
    try:
        if data is None:
            with open(path, "rb") as f:
                head = f.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                body = f.read(length) if 0 <= length <= MAX_HEADER else b""
        else:
            length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
            body = data[8:8 + length] if 0 <= length <= MAX_HEADER else b""
        if length < 0 or length > MAX_HEADER or len(body) != length:
            raise EntryProblem("corrupt", "truncated or damaged safetensors header")
        header = json.loads(body)
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
    except OSError as err:
        raise EntryProblem("corrupt", f"unreadable ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSON
        raise EntryProblem("corrupt", f"bad safetensors header ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise EntryProblem("corrupt", f"not a {FORMAT} entry")
    return metadata


def check_identity(metadata: dict[str, str], identity: dict[str, Any]) -> None:
    if metadata.get("identity") != canonical(identity):
        try:
            theirs = json.loads(metadata.get("identity") or "{}")
        except ValueError:
            theirs = {}
        changed = sorted(k for k in {*theirs, *identity} if theirs.get(k) != identity.get(k))
        raise EntryProblem("stale", f"made for other encoders or settings (differs in {', '.join(changed)})")


def decode_entry(data: bytes, path: Path, identity: dict[str, Any], content: str | None):
    """The conditioning an entry file holds, after every check; EntryProblem otherwise."""
    from safetensors.torch import load

    metadata = read_header(path, data)
    check_identity(metadata, identity)
    try:
        tensors = load(data)
        values = json.loads(metadata["fields"])
        cls = TYPES[metadata["type"]]
    except Exception as err:  # noqa: BLE001 - safetensors' errors, KeyError, JSON: all mean a damaged file
        raise EntryProblem("corrupt", f"unreadable tensors or fields ({type(err).__name__}: {err})") from None
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise EntryProblem("corrupt", "checksum mismatch")
    if content is not None and metadata.get("content") != content:
        raise EntryProblem("stale", "made from another source image or instruction for this row")
    values = {k: [tuple(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], list) else v
              for k, v in values.items()}
    try:
        return cls(**tensors, **values)
    except TypeError as err:
        raise EntryProblem("corrupt", f"fields do not make a {cls.__name__} ({err})") from None


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def check_layout(cond, target_tokens: int | None) -> None:
    """A batch-1 entry whose shapes fit together and fit the run's target token grid; EntryProblem otherwise."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise EntryProblem("corrupt", f"wrong shapes: {what}")

    emb, src = cond.prompt_embeds, cond.source_latents
    need(emb.dim() == 3 and emb.shape[0] == 1, f"prompt_embeds {tuple(emb.shape)}, expected [1, Nt, D]")
    need(src is None or (src.dim() == 3 and src.shape[0] == 1), f"source_latents {_shape(src)}")
    source_tokens = 0 if src is None else src.shape[1]
    if isinstance(cond, FluxEditConditioning):
        pooled = cond.pooled_prompt_embeds
        need(pooled.dim() == 2 and pooled.shape[0] == 1, f"pooled_prompt_embeds {tuple(pooled.shape)}")
        need(tuple(cond.txt_ids.shape) == (emb.shape[1], 3), f"txt_ids {tuple(cond.txt_ids.shape)}")
        need(cond.img_ids.dim() == 2 and cond.img_ids.shape[1] == 3, f"img_ids {tuple(cond.img_ids.shape)}")
        if target_tokens is not None:
            need(cond.img_ids.shape[0] == target_tokens + source_tokens,
                 f"img_ids {tuple(cond.img_ids.shape)} for {target_tokens} target + {source_tokens} source tokens")
    else:
        mask = cond.prompt_embeds_mask
        need(mask is None or tuple(mask.shape) == tuple(emb.shape[:2]), f"prompt_embeds_mask {_shape(mask)}")
        shapes = cond.img_shapes
        need(isinstance(shapes, list) and bool(shapes) and all(len(s) == 3 for s in shapes), f"img_shapes {shapes}")
        if target_tokens is not None:
            need(shapes[0][1] * shapes[0][2] == target_tokens, f"img_shapes {shapes} for {target_tokens} tokens")
        if src is not None:
            need(sum(s[1] * s[2] for s in shapes[1:]) == source_tokens, f"img_shapes {shapes} for {source_tokens} "
                 "source tokens")


def write_entry(path: Path, data: bytes) -> None:
    """Atomically: a temporary file in the same folder, then `os.replace` (ranks racing on one row all write the
    same bytes; the last rename wins)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"cannot write the conditioning cache entry {path}: {err.strerror or err} (data.cache_dir; "
                      "free space, or use --data.cache_conditioning=memory)") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _to(cond, device: torch.device | str, *, copy: bool = False):
    """The conditioning with every tensor on `device` (`copy`: fresh tensors, so no batch's storage is kept)."""
    tensors, _ = _split_fields(cond)
    return dataclasses.replace(cond, **{name: t.to(device, copy=copy) for name, t in tensors.items()})


# ---------------------------------------------------------------------------------------------------- the cache


def _records(dataset) -> list[tuple[str, str]]:
    """(sample id, instruction) of every row, without decoding an image where the dataset allows it."""
    records = getattr(dataset, "records", None)
    if records is not None:
        return [(r.sample_id, r.prompt) for r in records]
    return [(s.sample_id, s.prompt) for s in (dataset[i] for i in range(len(dataset)))]


def cache_is_complete(directory: Path, identity: dict[str, Any], datasets: Sequence[Any], env: DistEnv) -> bool:
    """Whether every row of `datasets` has a valid-looking entry (its header names `identity`; the checksum is left
    to the lookup). The rows are split over ranks and the answer agreed, so every rank decides alike."""
    rows = [record for dataset in datasets if dataset is not None for record in _records(dataset)]
    missing = 0
    for sample_id, prompt in rows[env.rank::env.world_size]:
        path = directory / f"{entry_key(identity, sample_id, prompt)}{SUFFIX}"
        try:
            check_identity(read_header(path), identity)
        except EntryProblem:
            missing += 1
            break
    return all_reduce_max(float(missing), env) == 0


class ConditioningCache:
    """`cache(samples, rows, split, readable)` → the batch's conditioning on `device` (see the module docstring).

    `rows[i]` is sample i's row in the `split` dataset ('train' or 'eval'); it only groups a call's samples, the
    entry itself is found by content. `readable[i]` False (a stand-in image) encodes sample i without storing it.
    `stats` counts encoder calls, encoded rows, reused rows and bytes written, over the cache's life.
    """

    def __init__(self, family, mode: str = "off", *, identity: dict[str, Any] | None = None,
                 directory: Path | None = None, device: torch.device | str = "cpu", env: DistEnv | None = None,
                 lockstep: bool = False, warn: Callable[[str], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"data.cache_conditioning must be one of {MODES}, got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("the 'disk' conditioning cache needs a folder (data.cache_dir)")
        self.family, self.mode, self.device = family, mode, torch.device(device)
        self.identity = identity if identity is not None else identity_of(family)
        self.directory = None if directory is None else Path(directory)
        self.env = env or DistEnv()
        self.lockstep = lockstep and self.env.world_size > 1
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.memory: dict[str, tuple[str, Any]] = {}  # key -> (content hash, batch-1 conditioning on the CPU)
        self.stats = {"encoder_calls": 0, "padding_calls": 0, "encoded_rows": 0, "reused_rows": 0,
                      "bytes_written": 0, "replaced_entries": 0}
        self._warned: set[str] = set()
        shape = getattr(family, "latent_shape", None)
        self.target_tokens = int(shape[0]) if shape is not None else None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                from nftcore.config import ConfigError

                raise ConfigError(f"cannot create the conditioning cache folder {self.directory} (data.cache_dir): "
                                  f"{err.strerror or err}") from None

    @classmethod
    def for_run(cls, cfg, family, env: DistEnv, *, metrics=None,
                warn: Callable[[str], None] | None = None) -> ConditioningCache:
        """The cache `cfg.data.cache_conditioning` asks for ('off': every lookup is `family.conditioning`). Warnings
        go to `warn`, else to the run's `metrics` logger from every rank (each rank reads its own entries)."""
        mode = cfg.data.cache_conditioning
        if warn is None and metrics is not None:
            def warn(message: str) -> None:
                metrics.warn(message, every_rank=True)
        if mode == "off":
            return cls(family, "off", identity={}, device=env.device, env=env)
        return cls(family, mode, directory=directory_of(cfg) if mode == "disk" else None, device=env.device, env=env,
                   lockstep=bool(getattr(family, "text_encoders_sharded", False)), warn=warn)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    # ------------------------------------------------------------------------------------------------ lookup

    def __call__(self, samples: Sequence[Any], rows: Sequence[int], split: str,
                 readable: Sequence[bool] | None = None):
        if self.mode == "off":
            return self.family.conditioning(samples)
        entries, where, _ = self.resolve(samples, rows, split, readable)
        batch = entries[0] if len(entries) == 1 else cat_conditioning(entries)
        if where != list(range(len(entries))):
            batch = index_conditioning(batch, torch.tensor(where))
        return _to(batch, self.device)

    def resolve(self, samples: Sequence[Any], rows: Sequence[int], split: str,
                readable: Sequence[bool] | None = None) -> tuple[list[Any], list[int], dict[int, str]]:
        """(the distinct rows' batch-1 conditionings, each sample's position among them, {row: 'reused' |
        'encoded'} for the stored rows). Every rank must call this alike when `lockstep` (sharded encoders)."""
        samples, rows = list(samples), list(rows)
        readable = [True] * len(samples) if readable is None else [bool(r) for r in readable]
        if not (len(samples) == len(rows) == len(readable)):
            raise ValueError(f"{len(samples)} samples, {len(rows)} rows, {len(readable)} readable flags")
        slot: dict[Any, int] = {}
        distinct: list[tuple[Any, int | None]] = []  # (sample, row); row None: a stand-in, never stored
        where = []
        for sample, row, ok in zip(samples, rows, readable):
            name = (split, row) if ok else ("stand-in", len(distinct))
            if name not in slot:
                slot[name] = len(distinct)
                distinct.append((sample, row if ok else None))
            where.append(slot[name])
        entries: list[Any] = [None] * len(distinct)
        keys: list[tuple[str, str] | None] = [None] * len(distinct)
        status: dict[int, str] = {}
        for j, (sample, row) in enumerate(distinct):
            if row is None:
                continue
            keys[j] = (entry_key(self.identity, sample.sample_id, sample.prompt), content_hash(sample))
            entries[j] = self._find(*keys[j])
            if entries[j] is not None:
                status[row] = "reused"
        missing = [j for j, entry in enumerate(entries) if entry is None]
        self.stats["reused_rows"] += len(distinct) - len(missing)
        anyone = bool(missing)
        if self.lockstep:
            anyone = all_reduce_max(float(anyone), self.env) > 0
        if missing:
            fresh = self._encode([distinct[j][0] for j in missing])
            for i, j in enumerate(missing):
                entries[j] = _to(index_conditioning(fresh, torch.tensor([i])), "cpu", copy=True)
                sample, row = distinct[j]
                if row is not None:
                    self._store(*keys[j], entries[j], sample.sample_id)
                    status[row] = "encoded"
            self.stats["encoded_rows"] += sum(distinct[j][1] is not None for j in missing)
        elif anyone and samples:  # another rank encodes: this one joins the sharded encoder's collectives
            self._encode(samples[:1])
            self.stats["padding_calls"] += 1
        return entries, where, status

    def _encode(self, samples: list[Any]):
        self.stats["encoder_calls"] += 1
        return self.family.conditioning(samples)

    def _find(self, key: str, content: str):
        if self.mode == "memory":
            hit = self.memory.get(key)
            if hit is None:
                return None
            if hit[0] != content:
                self._warn_once(f"conditioning cache: the entry of row {key} in memory was made from another "
                                "source image or instruction; recomputing it")
                return None
            return hit[1]
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            return self._problem(path, EntryProblem("corrupt", f"unreadable ({err.strerror or err})"))
        try:
            cond = decode_entry(data, path, self.identity, content)
            check_layout(cond, self.target_tokens)
        except EntryProblem as problem:
            return self._problem(path, problem)
        return cond

    def _problem(self, path: Path, problem: EntryProblem) -> None:
        self.stats["replaced_entries"] += 1
        self._warn_once(f"conditioning cache: {problem.kind} entry {path}: {problem}; recomputing and rewriting it")
        return None

    def _warn_once(self, message: str) -> None:
        """Each (file, reason) once: an entry damaged again the same way is recomputed again, silently."""
        if message not in self._warned:
            self._warned.add(message)
            self.warn(message)

    def _store(self, key: str, content: str, entry, sample_id: str) -> None:
        if self.mode == "memory":
            self.memory[key] = (content, entry)
            return
        data = encode_entry(entry, self.identity, content, sample_id)
        write_entry(self.path(key), data)
        self.stats["bytes_written"] += len(data)
