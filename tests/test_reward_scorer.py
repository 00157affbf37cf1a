"""The MLLM judge against transformers' own paths, on a tiny random Qwen2.5-VL with the real Qwen2 vocabulary.

References (fp32, tolerance 1e-5 on the [0, 1] score):
- logits: softmax(model(**processor(...)).logits[:, -1, digit_ids]) . [0..5] / 5, the definition;
- generate: the first-step logits of `generate(max_new_tokens=1, output_logits=True)`, Edit-R1's transformers path.
The tiny judge's scores spread by a few 1e-2 (checked), so 1e-5 agreement is not vacuous.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from nftcore.reward import (
    DIGIT_RUBRIC,
    YES_NO_RUBRIC,
    MLLMReward,
    MLLMScorer,
    RewardResult,
    WeightedSum,
    answer_token_ids,
    digit_rubric,
)
from nftcore.reward.prompt import Rubric
from nftcore.testing.reference_judge import expected_value_score, judge_logits
from nftcore.testing.tiny_judge import TEST_MAX_PIXELS, TEST_MIN_PIXELS, qwen_tokenizer, random_images
from nftcore.utils.qwen_vl import build_processor, load_image_processor
from tests.helpers.judges import grouped_batch, tiny_judge_folder, tiny_scorer

TOL = 1e-5


def mixed_batch():
    """Four samples with different source/edit sizes and prompt lengths (so left padding is exercised)."""
    sources = random_images(10, [(64, 64), (112, 84), (56, 100), (90, 90)])
    edited = random_images(11, [(64, 64), (84, 112), (70, 56), (112, 112)])
    instructions = ["add a hat", "turn the red car into a vintage blue bicycle leaning on a brick wall",
                    "make it night", "replace the background with a beach at sunset, keep the person"]
    requirements = ["a hat is on the head", "the bicycle is blue and vintage; the wall is unchanged", "",
                    "the person is unchanged and the beach looks natural"]
    return edited, sources, instructions, requirements


@functools.cache
def reference_processor():
    """The torchvision-free processor over the judge folder's image processor and the scorer's tokenizer (reusing
    the loaded tokenizer: reading the 151k-token tokenizer.json again costs seconds)."""
    image_processor = load_image_processor(tiny_judge_folder(), min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS)
    return build_processor(tiny_scorer().tokenizer, image_processor)


def reference_logits(scorer: MLLMScorer, edited, sources, instructions, requirements, *, use_generate=False):
    """[B, K] answer logits from transformers' own forward (or generate), through the stock-processor path."""
    return judge_logits(scorer, reference_processor(), edited, sources, instructions, requirements,
                        use_generate=use_generate)


def expected_score(logits: torch.Tensor, rubric: Rubric = DIGIT_RUBRIC) -> torch.Tensor:
    return expected_value_score(logits, rubric.values)


def test_answer_ids_come_from_the_real_vocabulary():
    tok = qwen_tokenizer()
    assert answer_token_ids(tok, DIGIT_RUBRIC.answers) == [15, 16, 17, 18, 19, 20]
    assert answer_token_ids(tok, YES_NO_RUBRIC.answers) == [9454, 2753]
    assert tiny_scorer().answer_ids == [15, 16, 17, 18, 19, 20]  # the scorer derives them from the loaded tokenizer
    with pytest.raises(ValueError, match="one"):
        answer_token_ids(tok, ["10"])  # Qwen2 splits numbers into digits: "10" is two tokens
    with pytest.raises(ValueError, match="0 <= low < high <= 9"):
        digit_rubric(0, 10)


def test_scores_match_forward_and_generate_with_left_padding():
    scorer = tiny_scorer()
    batch = mixed_batch()
    got = scorer.score(*batch)
    ref = expected_score(reference_logits(scorer, *batch))
    gen = expected_score(reference_logits(scorer, *batch, use_generate=True))
    alone = torch.cat([scorer.score(*[x[i:i + 1] for x in batch]) for i in range(4)])
    errs = {"forward": (got - ref).abs().max().item(), "generate": (got - gen).abs().max().item(),
            "alone vs batch": (got - alone).abs().max().item()}
    print(f"scores {got.tolist()} | max abs errors {errs}")
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert ((got >= 0) & (got <= 1)).all()
    assert got.std() > 5e-3, "the tiny judge must give different inputs different scores"
    assert max(errs.values()) < TOL


def test_shared_prefix_equals_per_sample_scoring(monkeypatch):
    scorer = tiny_scorer()
    batch = grouped_batch()  # 2 groups x K = 3; group 1 mixes edit sizes
    calls = []
    original = scorer._forward_shared
    monkeypatch.setattr(scorer, "_forward_shared", lambda groups, *a: calls.append(groups) or original(groups, *a))
    shared = scorer.score(*batch)
    assert calls == [[[0, 1, 2], [3, 4, 5]]], "both groups must go through one shared-prefix chunk"
    full = scorer.score(*batch, share_prefix=False)
    alone = torch.cat([scorer.score(*[x[i:i + 1] for x in batch]) for i in range(6)])
    ref = expected_score(reference_logits(scorer, *batch))
    errs = {"vs one-forward": (shared - full).abs().max().item(), "vs alone": (shared - alone).abs().max().item(),
            "vs model()": (shared - ref).abs().max().item()}
    print(f"scores {shared.tolist()} | max abs errors {errs}")
    assert shared.std() > 5e-3
    assert max(errs.values()) < TOL


def test_last_layer_mlp_runs_on_the_last_position_only():
    """The scorer trims the last layer's MLP to the scored position (see `_last_layer_mlp_on_last_position`); this
    guards against the hook silently not applying, and checks it is removed after the call."""
    scorer = tiny_scorer()
    mlp = scorer.model.model.language_model.layers[-1].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        scorer.score(*grouped_batch())
        assert seen and all(shape[1] == 1 for shape in seen), seen
        seen.clear()
        scorer.model(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == [(1, 3, 64)], "the hook must not outlive score()"
    finally:
        handle.remove()


def test_small_max_batch_splits_groups_without_changing_scores():
    scorer = tiny_scorer()
    batch = grouped_batch(seed=3)
    want = scorer.score(*batch)
    small = MLLMScorer(scorer.model, scorer.tokenizer, scorer.image_processor, max_batch=2, vision_batch=1)
    got = small.score(*batch)
    assert (got - want).abs().max() < TOL


def test_tensor_images_are_accepted():
    scorer = tiny_scorer()
    edited, sources, instructions, requirements = grouped_batch(seed=5)
    as_tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
                             for im in edited[:3]])  # [3, 3, 64, 64] floats in [0, 1], as the trainer decodes
    got = scorer.score(as_tensor, sources[:3], instructions[:3], requirements[:3])
    want = scorer.score(edited[:3], sources[:3], instructions[:3], requirements[:3])
    assert (got - want).abs().max() < TOL


def test_yes_no_rubric_reads_p_yes():
    base = tiny_scorer()
    scorer = MLLMScorer(base.model, base.tokenizer, base.image_processor, rubric=YES_NO_RUBRIC)
    assert scorer.answer_ids == [9454, 2753]
    batch = grouped_batch(seed=7)
    got = scorer.score(*batch)
    logits = reference_logits(scorer, *batch)  # [B, 2]: Yes, No
    p_yes = torch.softmax(logits, -1)[:, 0]
    print(f"p(Yes) {got.tolist()}")
    assert ((got >= 0) & (got <= 1)).all()
    assert (got - p_yes).abs().max() < TOL
    assert "Yes or No" in scorer.conversation_text("x", "y")


def test_custom_digit_range_and_template():
    base = tiny_scorer()
    rubric = digit_rubric(1, 3, template="Instruction: {instruction}. Need: {requirement}. Score {low}-{high}.")
    scorer = MLLMScorer(base.model, base.tokenizer, base.image_processor, rubric=rubric)
    assert scorer.answer_ids == [16, 17, 18]
    assert "Score 1-3." in scorer.conversation_text("x", "y")
    batch = mixed_batch()
    got = scorer.score(*batch)
    assert (got - expected_score(reference_logits(scorer, *batch), rubric)).abs().max() < TOL


def test_mllm_reward_interface_and_weighted_sum():
    scorer = tiny_scorer()
    edited, sources, prompts, requirements = grouped_batch(seed=9)
    metadata = [{"requirement": r} for r in requirements]
    reward = MLLMReward(scorer)
    res = reward(edited, sources, prompts, metadata)
    assert isinstance(res, RewardResult) and res.valid.all() and res.num_invalid == 0
    assert (res.scores - scorer.score(edited, sources, prompts, requirements)).abs().max() < TOL
    with pytest.raises(ValueError, match="requirement"):
        reward(edited, sources, prompts, [{}] * len(prompts))

    def half_broken(e, s, p, m):  # a reward whose odd samples failed
        r = RewardResult.from_scores([1.0, float("nan")] * (len(p) // 2))
        return RewardResult(r.scores, r.valid, errors=("odd samples timed out",))

    combo = WeightedSum({"mllm": (reward, 2.0), "other": (half_broken, 0.5)})
    out = combo(edited, sources, prompts, metadata)
    assert out.valid.tolist() == [True, False] * 3
    assert torch.isnan(out.scores[1::2]).all(), "an invalid sample must be NaN, never a number"
    assert torch.allclose(out.scores[0::2], 2.0 * res.scores[0::2] + 0.5)
    assert set(out.details) == {"mllm", "other"} and out.errors == ("other: odd samples timed out",)
    with pytest.raises(ValueError, match="same length"):
        reward(edited[:2], sources, prompts, metadata)
