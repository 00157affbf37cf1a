"""Tiny random Qwen2.5-VL judges with the real Qwen2 vocabulary, and random images to judge, built offline: the
reward tests, the text encoder of the tiny Qwen-Image-Edit pipeline and the scorer / epoch benchmarks use them.

Building the 151k-token tokenizer costs seconds, so it is built once per process (`qwen_tokenizer()` is cached) and
saved once per folder. The models are random, so their scores mean nothing; what the tests need is that the scores
*move* with the input. A random 0.02-std head gives digit logits within ~0.2 of each other (every score ~0.5, which
would make "equal within 1e-5" nearly vacuous), so `build_tiny_judge` scales the rows of the answer tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # transformers is imported where a model is built: importing this module stays light
    from transformers import Qwen2_5_VLConfig

# Test image bounds: 56x56 .. 112x112 pixels -> 4 .. 16 image tokens per image, so a test batch stays small.
TEST_MIN_PIXELS = 56 * 56
TEST_MAX_PIXELS = 112 * 112
ANSWER_TOKENS = ("0", "1", "2", "3", "4", "5", "Yes", "No")
QWEN_DIGIT_IDS = [15, 16, 17, 18, 19, 20]  # "0".."5" in the Qwen2/2.5 tokenizer (Edit-R1's score_idx)


@functools.cache
def qwen_tokenizer():
    """The real-vocabulary Qwen2.5-VL tokenizer (left padding), built once per process."""
    from nftcore.utils.qwen_vl import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, mrope_section=(2, 3, 3), vision_depth: int = 1, vision_hidden: int = 32,
                vision_heads: int = 2, vision_intermediate: int = 64, tie_word_embeddings: bool = False,
                attn_implementation: str = "sdpa") -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of any small size; `mrope_section` must sum to head_dim / 2 = hidden / heads / 2."""
    from transformers import Qwen2_5_VLConfig

    assert sum(mrope_section) * 2 == hidden // heads, "mrope_section must sum to head_dim / 2"
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
                rope_theta=1e6, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=tie_word_embeddings)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                  intermediate_size=vision_intermediate, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_judge(tokenizer=None, *, seed: int = 0, answer_scale: float = 10.0, attention_gain: float = 5.0,
                     **config_kwargs):
    """A random fp32 Qwen2.5-VL in eval mode whose scores depend visibly on the images and the text.

    At the stock 0.02 init the last position's hidden state is almost only its own token embedding (attention adds
    ~1 %), so every input scores the same to 3 digits. `attention_gain` scales each language layer's v/o projections
    (the context reaches the last position) and `answer_scale` the answer tokens' head rows (the distribution over
    answers is far from uniform): with the defaults the scores of a test batch spread by a few 1e-2.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **config_kwargs)).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.v_proj.weight *= attention_gain
            layer.self_attn.o_proj.weight *= attention_gain
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ANSWER_TOKENS]
        model.lm_head.weight[ids] *= answer_scale
    return model


def save_tiny_judge(folder: str | Path, model=None, tokenizer=None, *, min_pixels: int = TEST_MIN_PIXELS,
                    max_pixels: int = TEST_MAX_PIXELS) -> Path:
    """Write model + tokenizer + PIL image-processor config to `folder`, the layout `MLLMScorer.from_pretrained`
    loads (the same as a released Qwen2.5-VL checkpoint, minus the video processor)."""
    from nftcore.utils.qwen_vl import build_image_processor

    folder = Path(folder)
    tokenizer = tokenizer or qwen_tokenizer()
    model = model if model is not None else build_tiny_judge(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_image_processor(min_pixels, max_pixels).save_pretrained(folder)
    return folder


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth-ish random RGB image (a blurred noise field, so resizing changes it gracefully)."""
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def random_images(seed: int, sizes) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [random_image(rng, w, h) for w, h in sizes]
