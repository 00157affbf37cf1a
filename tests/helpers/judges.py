"""The tiny judge as the reward tests use it: saved and loaded once per process (the 151k-token tokenizer costs
seconds), and a grouped batch to score. The judge itself is built by `nftcore.testing.tiny_judge`."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from nftcore.testing.tiny_judge import TEST_MAX_PIXELS, TEST_MIN_PIXELS, random_images, save_tiny_judge


@functools.cache
def tiny_judge_folder() -> Path:
    """A saved default tiny judge, written once per process to a temporary folder (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="nftcore-tiny-judge-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_tiny_judge(folder)


@functools.cache
def tiny_scorer():
    """`MLLMScorer.from_pretrained(tiny_judge_folder())` in fp32 on CPU, loaded once per process."""
    from nftcore.reward import MLLMScorer

    return MLLMScorer.from_pretrained(tiny_judge_folder(), dtype=torch.float32, min_pixels=TEST_MIN_PIXELS,
                                      max_pixels=TEST_MAX_PIXELS)


def grouped_batch(seed: int = 0):
    """Two groups of K = 3 edits: group 0 (one source, one instruction) has same-size edits; group 1 mixes edit
    sizes. Returns (edited, sources, instructions, requirements)."""
    sources = random_images(seed, [(64, 64), (100, 80)])
    edited = random_images(seed + 1, [(64, 64), (64, 64), (64, 64), (100, 80), (56, 90), (112, 112)])
    instructions = ["make the sky blue"] * 3 + ["remove the cat from the sofa and keep everything else unchanged"] * 3
    requirements = ["the sky is blue, nothing else changes"] * 3 + ["no cat remains; the sofa is intact"] * 3
    return edited, [sources[0]] * 3 + [sources[1]] * 3, instructions, requirements
