"""`python -m nftcore.edit`: edit images with FLUX.1-Kontext or Qwen-Image-Edit(-2509), with or without a LoRA.

One image:
    python -m nftcore.edit --model PIPELINE_FOLDER [--lora FILE_OR_FOLDER] --image in.png --prompt "..." --out out.png
A prompt list (an Edit-R1 split, GEdit-Bench jsonl, ImgEdit json), batched, resumable, over torchrun ranks:
    python -m nftcore.edit --model PIPELINE_FOLDER --jsonl FILE [--images DIR] --out DIR [--score JUDGE]
        [--compare-base]

Settings come from a preset (`--preset`, default: the one the pipeline folder implies), each overridable. Exit code
0 when every item was edited, 1 when any item (or prompt-list line) failed (the rest are still edited and listed in
OUT/manifest.jsonl), 2 for a bad command line, model, preset or LoRA. See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m nftcore.edit"
USAGE_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Edit images with an instruction-editing model (+ LoRA).")
    p.add_argument("--model", required=True, help="diffusers pipeline folder (or a Hugging Face id in the cache)")
    p.add_argument("--lora", help="LoRA: a .safetensors file, a PEFT folder or a diffusers-layout folder")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha for a file without a config")
    p.add_argument("--preset", default="auto", help="kontext, qwen-image-edit, qwen-image-edit-2509 or auto")
    src = p.add_argument_group("inputs (one image, or a prompt list)")
    src.add_argument("--image", help="source image (with --prompt)")
    src.add_argument("--prompt", help="the instruction (with --image)")
    src.add_argument("--jsonl", help="prompt list: Edit-R1 *.jsonl, GEdit-Bench *.jsonl or ImgEdit *.json")
    src.add_argument("--images", help="folder the prompt list's image paths are relative to (default: its folder)")
    src.add_argument("--format", default="auto", help="prompt-list format: auto, edit-r1, gedit, imgedit")
    src.add_argument("--limit", type=int, help="edit only the first N items")
    p.add_argument("--out", required=True, help="output image (with --image) or folder (with --jsonl)")
    s = p.add_argument_group("sampling (defaults from the preset)")
    s.add_argument("--steps", type=int, dest="num_steps")
    s.add_argument("--guidance", type=float, help="FLUX.1-Kontext's guidance embedding (preset 3.5)")
    s.add_argument("--true-cfg-scale", type=float, help="true CFG scale; 1 = off (Qwen presets 4.0)")
    s.add_argument("--negative-prompt", help="negative prompt of true CFG (Qwen presets ' ')")
    s.add_argument("--max-area", type=int, help="pixels of the edit (preset 1024*1024)")
    s.add_argument("--no-auto-resize", action="store_true",
                   help="Kontext: encode the source at its own size, not the closest preferred resolution")
    s.add_argument("--max-sequence-length", type=int, help="text tokens (Kontext T5 padding, Qwen truncation)")
    s.add_argument("--solver", help="euler (the pipelines') or dpm2")
    s.add_argument("--seed", type=int, default=0, help="run seed; item noise = f(seed, item key)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    r.add_argument("--device", help="default cuda:LOCAL_RANK when CUDA is available, else cpu")
    r.add_argument("--overwrite", action="store_true", help="redo items already in --out")
    r.add_argument("--no-progress", action="store_true")
    e = p.add_argument_group("evaluation")
    e.add_argument("--score", metavar="JUDGE", help="score every edit with this local Qwen2.5-VL judge folder")
    e.add_argument("--judge-max-pixels", type=int, help="the judge's image-processor max_pixels")
    e.add_argument("--compare-base", action="store_true", help="also edit without the LoRA; compare the two")
    e.add_argument("--grid-items", type=int, default=8, help="items in the compare grid")
    e.add_argument("--group-by", help="manifest field the score table is split by (default: task_type or "
                                      "edit_type when the items have it)")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return USAGE_EXIT


def _check_args(args) -> str | None:
    single, listed = args.image is not None or args.prompt is not None, args.jsonl is not None
    if single == listed:
        return "give either --image and --prompt, or --jsonl"
    if single and (args.image is None or not args.prompt or not args.prompt.strip()):
        return "--image needs a non-empty --prompt (and --prompt an --image)"
    if args.compare_base and not args.lora:
        return "--compare-base needs --lora"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be >= 1, got {args.limit}"
    if args.score and not Path(args.score).is_dir():
        return f"--score {args.score}: not a folder (a local Qwen2.5-VL judge)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return _fail(problem)

    import torch

    from nftcore.data.benchmarks import EditItem, read_prompt_list
    from nftcore.inference.editor import DTYPES, Editor
    from nftcore.inference.lora import LoRAMismatchError
    from nftcore.inference.presets import preset_for, resolve
    from nftcore.inference.run import RunOptions, init_dist, run_items
    from nftcore.trainer.edit_family import pipeline_folder

    try:
        folder = pipeline_folder(args.model)
        name = preset_for(folder) if args.preset == "auto" else args.preset
        preset = resolve(name, num_steps=args.num_steps, guidance=args.guidance, true_cfg_scale=args.true_cfg_scale,
                         negative_prompt=args.negative_prompt, max_area=args.max_area,
                         auto_resize=False if args.no_auto_resize else None,
                         max_sequence_length=args.max_sequence_length, solver=args.solver)
        if preset.solver not in ("euler", "dpm2"):
            raise ValueError(f"unknown solver {preset.solver!r}; valid: euler, dpm2")
        if args.lora and not Path(args.lora).exists():
            raise FileNotFoundError(f"--lora {args.lora}: no such file or folder")
        if args.jsonl:
            listing = read_prompt_list(args.jsonl, args.images, args.format)
            items, bad = listing.items[: args.limit] if args.limit else listing.items, listing.bad
            out = Path(args.out)
        else:
            target = Path(args.out)
            items = [EditItem(target.stem, args.prompt, Path(args.image), target.name, where=args.image)]
            bad, out = [], target.parent
        env = init_dist(args.device)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))

    dtype = DTYPES[args.dtype or ("bf16" if env.device.type == "cuda" else "fp32")]
    group_field = args.group_by or next((f for f in ("task_type", "edit_type") if items and f in items[0].metadata),
                                        None)
    settings = {"model": str(folder.resolve()), "lora": str(Path(args.lora).resolve()) if args.lora else None,
                "lora_alpha": args.lora_alpha, "preset": preset.settings(), "seed": args.seed,
                "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
                "judge": str(Path(args.score).resolve()) if args.score else None}
    options = RunOptions(out=out, settings=settings, batch_size=args.batch_size, seed=args.seed,
                         compare_base=args.compare_base, grid_items=args.grid_items, overwrite=args.overwrite,
                         manifest=args.jsonl is not None, progress=not args.no_progress, group_field=group_field)

    def build_editor():
        return Editor(folder, preset, dtype=dtype, device=env.device, lora=args.lora, lora_alpha=args.lora_alpha,
                      keep_base=args.compare_base)

    def build_scorer():
        from nftcore.reward import MLLMScorer

        return MLLMScorer.from_pretrained(args.score, device=env.device, max_pixels=args.judge_max_pixels)

    try:
        return run_items(items, bad, options, env, build_editor, build_scorer if args.score else None)
    except (LoRAMismatchError, ValueError, FileNotFoundError, RuntimeError) as exc:
        return _fail(str(exc))
    finally:
        if env.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
