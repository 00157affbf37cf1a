"""Scoring an edit with a Qwen2.5-VL judge the way transformers (and Edit-R1's transformers reward server) does: the
oracle `MLLMScorer` is tested against (tests/test_reward_scorer.py), the baseline of bench/bench_scorer.py and the
judge of the reference epoch (`reference_epoch.py`).

How nftcore scores instead: docs/ALGORITHM.md §11.6.
"""

from __future__ import annotations

import torch


def reference_answer_logits(model, processor, texts, images, answer_ids, *, use_generate: bool = False):
    """[B, K] fp32 logits of the answer tokens at the first generated position, transformers' way.

    `images` are in conversation order (source, edited, source, edited, ...). `use_generate=False`: the definition,
    `model(**inputs).logits[:, -1]`; True: Edit-R1's transformers server, `generate(max_new_tokens=1,
    output_logits=True)` and its first-step logits. Both left-pad through the processor.
    """
    inputs = processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
    assert (inputs["attention_mask"][:, -1] == 1).all(), "the processor must left-pad"
    inputs = inputs.to(model.device)
    with torch.no_grad():
        if use_generate:
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            last = out.logits[0]  # [B, V], the raw logits of the first generated position
        else:
            last = model(**inputs).logits[:, -1]
    return last[:, list(answer_ids)].float().cpu()


def expected_value_score(logits: torch.Tensor, values) -> torch.Tensor:
    """(softmax(logits) . values - min) / (max - min): the rubric score from [B, K] answer logits."""
    v = torch.as_tensor(values, dtype=torch.float32)
    return (torch.softmax(logits, -1) @ v - v.min()) / (v.max() - v.min())


def judge_logits(scorer, processor, edited, sources, instructions, requirements, *, use_generate: bool = False):
    """[B, K] answer logits of `scorer`'s model on a batch, transformers' way: `scorer`'s conversation texts and the
    images in conversation order (per conversation: source, then edited) through `processor`."""
    texts = [scorer.conversation_text(i, r) for i, r in zip(instructions, requirements)]
    images = [im for pair in zip(sources, edited) for im in pair]
    return reference_answer_logits(scorer.model, processor, texts, images, scorer.answer_ids,
                                   use_generate=use_generate)


def generate_scores(scorer, processor, edited, sources, instructions, requirements) -> torch.Tensor:
    """[B] rubric scores as Edit-R1's transformers server computes them: `generate(max_new_tokens=1,
    output_logits=True)` over the left-padded batch, then the expected value of the answer distribution."""
    logits = judge_logits(scorer, processor, edited, sources, instructions, requirements, use_generate=True)
    return expected_value_score(logits, scorer.rubric.values)
