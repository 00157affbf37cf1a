"""Editing a prompt list: batches, ranks, resume, per-item failures, the manifest and the final report.

The plan is a pure function of the item list: items are cut into batches of `batch_size` in file order and batch i
goes to rank i % world_size. So every process agrees on the plan without talking, and an item is edited in the same
batch whatever the number of processes (with a fixed batch size the outputs are bit-identical across world sizes).

Resume: an item whose output file exists (written atomically) is skipped, unless `--score` needs a score the
manifest lacks, or `--compare-base` a base edit that is missing. Settings that change the images are stored in
`OUT/settings.json`; a rerun with different ones stops instead of mixing two models' edits in one folder.

Manifest: each rank appends one JSON line per item to `OUT/manifest.rank<r>.jsonl` as it goes (a crash loses at
most the batch in flight); after a barrier, rank 0 merges them, the latest line per item winning, into
`OUT/manifest.jsonl` in item order, prints the summary and writes `OUT/summary.json`.

See docs/INFERENCE.md, "Determinism, batching, processes" and "Outputs".
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nftcore.data.benchmarks import BadItem, EditItem, load_source_image
from nftcore.inference.editor import item_seed
from nftcore.inference.report import comparison_grid, paired_difference, score_table

__all__ = ["Dist", "RunOptions", "init_dist", "run_items"]

IMAGE_AFFECTING = ("model", "lora", "lora_alpha", "preset", "seed", "dtype")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_dist(device: str | None = None) -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(device) if device else torch.device(f"cuda:{local}" if cuda else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if world == 1:
        return Dist(device=dev)
    import torch.distributed as dist

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


@dataclass
class RunOptions:
    out: Path
    settings: dict[str, Any]
    batch_size: int = 1
    seed: int = 0
    compare_base: bool = False
    grid_items: int = 8
    overwrite: bool = False
    manifest: bool = True  # False: the single-image command (no manifest, no resume)
    progress: bool = True
    group_field: str | None = None


# ------------------------------------------------------------------------------------------------ bookkeeping


def _read_jsonl(path: Path) -> list[dict]:
    """The lines of a manifest; a torn last line (a crash mid-write) is ignored."""
    rows = []
    if path.is_file():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return rows


def _latest(out: Path) -> dict[str, dict]:
    """key -> the newest manifest entry over the merged manifest and every rank's file."""
    latest: dict[str, dict] = {}
    for path in [out / "manifest.jsonl", *sorted(out.glob("manifest.rank*.jsonl"))]:
        for row in _read_jsonl(path):
            key = row.get("key")
            if key is not None and (key not in latest or row.get("time", 0) >= latest[key].get("time", 0)):
                latest[key] = row
    return latest


def _check_settings(out: Path, settings: dict, overwrite: bool, env: Dist) -> None:
    path = out / "settings.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        changed = [k for k in IMAGE_AFFECTING if old.get(k) != settings.get(k)]
        if changed:
            raise ValueError(f"{out} holds edits made with other settings ({', '.join(changed)} differ: "
                             f"{ {k: old.get(k) for k in changed} } before); use another --out, or --overwrite")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _save_png(image, path: Path) -> None:
    from nftcore.data import to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: an existing file is always a whole image


def _base_output(item: EditItem) -> str:
    return f"base/{item.output}"


class _Progress:
    """tqdm when installed, else one line per batch; rank 0 only."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.bar, self.done, self.total, self.enabled, self.label = None, 0, total, enabled, label
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="item", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------- editing


class _Worker:
    """Edits this rank's batches and appends their manifest entries."""

    def __init__(self, options: RunOptions, env: Dist, previous: dict[str, dict], *, scoring: bool):
        self.options, self.env, self.previous, self.scoring = options, env, previous, scoring
        self.editor = self.scorer = None  # built once there is work
        self.log = options.out / f"manifest.rank{env.rank}.jsonl" if options.manifest else None
        self.records: list[dict] = []

    def done(self, item: EditItem) -> bool:
        o = self.options
        if not o.manifest or o.overwrite or not (o.out / item.output).is_file():
            return False
        if o.compare_base and not (o.out / _base_output(item)).is_file():
            return False
        entry = self.previous.get(item.key, {})
        if self.scoring and (entry.get("score") is None
                                        or (o.compare_base and entry.get("base_score") is None)):
            return False
        return True

    def record(self, item: EditItem, **fields) -> None:
        entry = {"key": item.key, "prompt": item.prompt, "source": str(item.image_path), "output": item.output,
                 "where": item.where, "requirement": item.requirement, **item.metadata, **fields,
                 "seed": item_seed(self.options.seed, item.key), "rank": self.env.rank, "time": time.time(),
                 "settings": self.options.settings}
        self.records.append(entry)
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def batch(self, items: list[EditItem]) -> None:
        loaded = []
        for item in items:
            try:
                image = load_source_image(item.image_path)
                loaded.append((item, image, self.editor.size_key(image)))
            except Exception as exc:  # noqa: BLE001 - one bad source must not stop the run
                self.record(item, status="error", error=f"{item.where}: {exc}")
        groups: dict[Any, list] = {}
        for entry in loaded:
            groups.setdefault(entry[2], []).append(entry)
        for (size, _), group in groups.items():
            members = [g[0] for g in group]
            try:
                self._edit_group(members, [g[1] for g in group], size)
            except Exception as exc:  # noqa: BLE001 - recorded per item; the rest of the run goes on
                for item in members:
                    self.record(item, status="error", error=f"{item.where}: {type(exc).__name__}: {exc}")

    def _edit_group(self, items: list[EditItem], sources: list, size: tuple[int, int]) -> None:
        o, editor = self.options, self.editor
        prompts = [it.prompt for it in items]
        seeds = [item_seed(o.seed, it.key) for it in items]
        edited = editor.edit(sources, prompts, seeds)
        base = editor.edit(sources, prompts, seeds, base=True) if o.compare_base else None
        scores = base_scores = None
        if self.scorer is not None:
            requirements = [it.requirement for it in items]
            scores = self.scorer.score(list(edited), sources, prompts, requirements).tolist()
            if base is not None:
                base_scores = self.scorer.score(list(base), sources, prompts, requirements).tolist()
        for i, item in enumerate(items):
            _save_png(edited[i], o.out / item.output)
            fields = {"status": "ok", "width": size[0], "height": size[1]}
            if base is not None:
                _save_png(base[i], o.out / _base_output(item))
                fields["base_output"] = _base_output(item)
            if scores is not None:
                fields["score"] = scores[i]
            if base_scores is not None:
                fields["base_score"] = base_scores[i]
            self.record(item, **fields)


def _plan(items: list[EditItem], batch_size: int, env: Dist) -> list[list[EditItem]]:
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[env.rank::env.world_size]


def run_items(items: list[EditItem], bad: list[BadItem], options: RunOptions, env: Dist,
              build_editor: Callable[[], Any], build_scorer: Callable[[], Any] | None = None) -> int:
    """Edit `items` (this rank's share), merge and report on rank 0. Returns the exit code (1 if any item or
    prompt-list entry failed), the same on every rank."""
    if options.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {options.batch_size}")
    if options.manifest:
        _check_settings(options.out, options.settings, options.overwrite, env)
        env.barrier()  # settings.json checked and written before any rank appends anything
    previous = _latest(options.out) if options.manifest else {}
    worker = _Worker(options, env, previous, scoring=build_scorer is not None)
    mine = _plan(items, options.batch_size, env)
    todo = [[it for it in batch if not worker.done(it)] for batch in mine]
    total = sum(len(b) for b in todo)
    skipped = sum(len(b) for b in mine) - total
    if total:  # a finished run resumed loads nothing
        worker.editor = build_editor()
        worker.scorer = build_scorer() if build_scorer is not None else None
    label = "edit" if env.world_size == 1 else f"edit (rank 0 of {env.world_size})"
    progress = _Progress(total, options.progress and env.is_main, label)
    for batch in todo:
        if batch:
            worker.batch(batch)
            progress.update(len(batch))
    progress.close()
    if not options.manifest:
        return _single_report(worker.records, options.out)
    env.barrier()
    code = _merge_and_report(items, bad, options, skipped) if env.is_main else None
    return env.broadcast(code)


def _single_report(records: list[dict], out: Path) -> int:
    failed = [r for r in records if r["status"] != "ok"]
    for r in records:
        if r["status"] == "ok":
            extra = "".join(f", {k} {r[k]:.4f}" for k in ("score", "base_score") if r.get(k) is not None)
            print(f"wrote {out / r['output']} ({r['width']}x{r['height']}{extra})")
        else:
            print(f"error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _merge_and_report(items: list[EditItem], bad: list[BadItem], options: RunOptions, skipped: int) -> int:
    out = options.out
    latest = _latest(out)
    rows = []
    for b in bad:
        rows.append({"key": b.key, "where": b.where, "status": "error", "error": f"{b.where}: {b.error}",
                     "time": time.time(), "settings": options.settings})
    for item in items:
        row = latest.get(item.key)
        if row is None:  # written by a run that died before its manifest line
            row = {"key": item.key, "prompt": item.prompt, "output": item.output, "status": "ok",
                   "note": "output found, no manifest line", "settings": options.settings}
            if not (out / item.output).is_file():
                row.update(status="error", error=f"{item.where}: no output was written")
        rows.append(row)
    tmp = out / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / "manifest.jsonl")
    for path in out.glob("manifest.rank*.jsonl"):
        path.unlink()  # merged: the manifest is the record from now on

    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    summary: dict[str, Any] = {"items": len(rows), "ok": len(ok), "failed": len(failed), "skipped": skipped}
    print(f"# {len(ok)} ok ({skipped} done by an earlier run), {len(failed)} failed; manifest: "
          f"{out / 'manifest.jsonl'}")
    for r in failed[:20]:
        print(f"#   failed {r['key']}: {r.get('error')}", file=sys.stderr)
    if any(r.get("score") is not None for r in ok):
        print(score_table(ok, options.group_field))
        scored = [r["score"] for r in ok if r.get("score") is not None]
        summary["score_mean"] = sum(scored) / len(scored)
    if options.compare_base:
        pairs = [(r["score"], r["base_score"]) for r in ok
                 if r.get("score") is not None and r.get("base_score") is not None]
        if pairs:
            stats = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
            summary["compare"] = stats
            ci = (f"[{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]" if not math.isnan(stats["ci_low"])
                  else "n/a (one item)")
            print(f"# base mean {stats['base_mean']:.4f}, trained mean {stats['trained_mean']:.4f}, difference "
                  f"{stats['diff_mean']:+.4f}, 95% CI {ci} (t, n = {stats['n']})")
        grid_path = _write_grid(items, options)
        if grid_path is not None:
            summary["grid"] = str(grid_path)
            print(f"# grid (source | base | trained): {grid_path}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


def _write_grid(items: list[EditItem], options: RunOptions) -> Path | None:
    from PIL import Image

    rows = []
    for item in items:
        if len(rows) >= options.grid_items:
            break
        trained, base = options.out / item.output, options.out / _base_output(item)
        if trained.is_file() and base.is_file():
            try:
                rows.append([load_source_image(item.image_path), Image.open(base).convert("RGB"),
                             Image.open(trained).convert("RGB")])
            except Exception:  # noqa: BLE001 - a grid row is a convenience, never a failure
                continue
    if not rows:
        return None
    path = options.out / "compare_grid.png"
    comparison_grid(rows).save(path)
    return path
