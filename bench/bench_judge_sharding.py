"""What sharding the in-process judge costs and saves (`parallel.shard_reward_model`): a rank's share of one epoch
scored by a whole Qwen2.5-VL on every rank vs the same judge FSDP2-sharded over the ranks (`shard_judge`), under
torchrun.

Each rank scores what a rank scores in one epoch of training: `--batches` rollout batches of `--batch` edits, all of
one group (one source; the defaults, 4 x 3, are one K = 12 group), its own images. Providers, each timed over the
whole share:

- `whole`: the whole judge on every rank (`reward.backend=local`), one call per rollout batch, as the trainer calls
  it (on its reward thread, overlapped with the next rollout batch; here timed alone). **The baseline.**
- `sharded:per-batch`: the sharded judge called the same way: every call gathers every layer once.
- `sharded`: the sharded judge as the trainer calls it: the rank's whole share in one call after its rollouts, so the
  layers are gathered once per language-model chunk and the group's prefix is shared by all its edits.

Sharding: every vision block and decoder layer gathered for its forward and freed after, the call counts agreed by
one all-reduce per call (`MLLMScorer.lockstep`). Time: wall clock per share (median, p20-p80 over `--repeats`, the
slowest rank's, after one warm-up). Memory: the bytes of parameters each rank holds (local shards + the whole LM
head), computed from the tensors. All providers' scores must agree within 1e-5 (fp32); the run fails otherwise.

The model is a random Qwen2.5-VL with the real vocabulary, untied head, hidden 512, 8 layers (~190 M parameters, of
which the vocabulary rows are 155 M: far more than in a 7B or 32B judge, where the layers dominate, so the per-rank
saving is printed for the sharded part as well as in total).

    python bench/bench_judge_sharding.py                  # 2 gloo ranks, 1 thread each, appends to results.csv
    python bench/bench_judge_sharding.py --ranks 2 --batch 3 --batches 4 --size 448 --repeats 3 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_judge_sharding.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness  # noqa: E402

BENCH = "judge_sharding"
PROVIDERS = ("whole", "sharded:per-batch", "sharded")
MODEL = dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2048, mrope_section=(8, 12, 12),
             vision_depth=4, vision_hidden=256, vision_heads=4, vision_intermediate=1024, tie_word_embeddings=False)
ROOT = Path(__file__).resolve().parents[1]


def build_model_folder(folder: Path, smoke: bool = False) -> Path:
    """The benchmark's judge (MODEL), or with `smoke` the tests' 2-layer one."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nftcore.testing.tiny_judge import build_tiny_judge, qwen_tokenizer, save_tiny_judge, tiny_config

    tok = qwen_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_judge(tok) if smoke else Qwen2_5_VLForConditionalGeneration(tiny_config(tok, **MODEL)).eval()
    return save_tiny_judge(folder, model, tok, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def param_bytes(model) -> dict[str, int]:
    """Bytes of parameters this rank holds: sharded (local shards of DTensors, or everything FSDP2 would shard when
    nothing is) and whole (the LM head)."""
    from torch.distributed.tensor import DTensor

    out = {"sharded_part": 0, "whole_part": 0}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        out["whole_part" if name.startswith("lm_head") else "sharded_part"] += local.numel() * local.element_size()
    return out


def worker(args) -> None:
    """One torchrun rank: time whole, shard, time sharded; rank 0 writes every rank's numbers to args.out."""
    import torch.distributed as dist

    from nftcore.reward import MLLMScorer
    from nftcore.testing.tiny_judge import random_images
    from nftcore.trainer.inference_sharding import shard_judge

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    n = args.batch * args.batches
    images = random_images(100 + rank, [(args.size, args.size)] * (n + 1))
    share = (images[1:], [images[0]] * n, ["make the sky look like a sunset"] * n,
             ["the sky is orange-red; the buildings keep their shapes"] * n)
    per_batch = [tuple(x[b:b + args.batch] for x in share) for b in range(0, n, args.batch)]
    scorer = MLLMScorer.from_pretrained(args.folder, dtype=torch.float32)

    def timed(calls) -> tuple[list[float], torch.Tensor]:
        scores = torch.cat([scorer.score(*c) for c in calls])  # warm-up
        ms = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            for c in calls:
                scorer.score(*c)
            ms.append((time.perf_counter() - t0) * 1e3)
        return ms, scores

    mine = {"rank": rank, "ms": {}, "bytes": {"whole": param_bytes(scorer.model)}, "scores": {}}
    mine["ms"]["whole"], mine["scores"]["whole"] = timed(per_batch)
    shard_judge(scorer, torch.device("cpu"))
    mine["bytes"]["sharded:per-batch"] = mine["bytes"]["sharded"] = param_bytes(scorer.model)
    mine["ms"]["sharded:per-batch"], mine["scores"]["sharded:per-batch"] = timed(per_batch)
    mine["ms"]["sharded"], mine["scores"]["sharded"] = timed([share])
    base = mine["scores"].pop("whole")
    mine["max_score_diff"] = max(float((base - s).abs().max()) for s in mine.pop("scores").values())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def timing(per_rank_ms: list[list[float]]) -> harness.Timing:
    """Per repeat the slowest rank (a step waits for it), then median and p20/p80."""
    return harness.summarize([max(call) for call in zip(*per_rank_ms)])


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=3, help="edits per rollout batch (the recipes' batch)")
    p.add_argument("--batches", type=int, default=4, help="rollout batches per rank per epoch")
    p.add_argument("--size", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--smoke", action="store_true", help="the tests' 2-layer judge (a check that it runs)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results.csv")
    p.add_argument("--json", help="also write the results here (tests/test_bench_judge_sharding.py reads them)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from nftcore.train import exit_process

        worker(args)
        exit_process(0)  # os._exit: gloo's threads can abort the interpreter's teardown (see exit_process)
    harness.print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = build_model_folder(Path(tmp) / "judge", args.smoke), Path(tmp) / "result.json"
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={args.ranks}", str(Path(__file__).resolve()),
               "--worker", "--folder", str(folder), "--out", str(out), "--batch", str(args.batch),
               "--batches", str(args.batches), "--size", str(args.size), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=1800)
        ranks = json.loads(out.read_text())
    diff = max(r["max_score_diff"] for r in ranks)
    if diff > 1e-5:
        raise SystemExit(f"sharded scores differ from the whole judge's by {diff:.2e} (> 1e-5)")
    case = f"{args.ranks} ranks gloo, {args.batches}x{args.batch} edits of a group, {args.size}px"
    results = []
    for provider in PROVIDERS:
        nbytes = ranks[0]["bytes"][provider]
        mb = {k: round(v / 2**20, 1) for k, v in nbytes.items()}
        results.append(harness.Result(BENCH, case, provider, "epoch_share", "fp32",
                                      timing([r["ms"][provider] for r in ranks]),
                                      extra={"param_mb_per_rank": round(sum(nbytes.values()) / 2**20, 1), **mb,
                                             "ranks": args.ranks, "threads_per_rank": args.threads,
                                             "calls": 1 if provider == "sharded" else args.batches,
                                             "max_score_diff": diff}))
    harness.print_table(results, "whole")
    for r in results:
        print(f"{r.provider:18s} parameters per rank: {r.extra['param_mb_per_rank']} MB "
              f"(sharded part {r.extra['sharded_part']} MB, LM head {r.extra['whole_part']} MB)")
    print(f"max |score difference| vs whole {diff:.2e}")
    if args.json:
        harness.write_json(results, args.json)
    if not args.no_record and not args.smoke:
        harness.append_results(results)
    return results


if __name__ == "__main__":
    main()
