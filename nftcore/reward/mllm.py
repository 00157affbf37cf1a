"""The MLLM judge: a Qwen2.5-VL's expected rubric score for (source, edited, instruction, requirement).

What it computes: one user turn [source image, edited image, rubric text], the chat
template's default system prompt and generation prompt; at the position where the answer would be generated,
p = softmax over the logits of the rubric's answer tokens ("0".."5") only, and score = E_p[value] normalised to
[0, 1] (sum_k k p_k / 5 for the digit rubric). See docs/ALGORITHM.md §3.3, §11.5 and §11.6.

How, and why not like the official code:
- No `generate()` and no [B, V] logits (the official servers run vLLM with a logits processor, or
  `generate(max_new_tokens=1)`, to read six numbers). One forward of the language model with left padding returns the
  final-normed hidden state; only its last position is used, through `nftcore.ops.score_logits` (subset mode) over the
  answer rows of the LM head.
- Each distinct image goes through the vision tower once per call (sources are shared by a group's K edits), in
  chunks of `vision_batch` images; the features are scattered into the token embeddings and the language model
  runs on `inputs_embeds`.
- Shared group prefix. The K edits of a group share the source image, so their conversations are identical up to the
  edited image's `<|vision_start|>`: [system, "user", source image]. That prefix is encoded once per group (the
  language model's key/value cache over the prefix tokens); the cache is gathered to one row per edit and the K
  continuations [edited image, rubric text, generation prompt] run on top of it. Per
  position this is exactly the computation of the full forward (same tokens, same multimodal RoPE positions, the
  same causal attention), so the score equals the per-sample score up to float rounding; tests check 1e-5 in fp32.
- Positions: Qwen2.5-VL's 3-D multimodal RoPE ids are computed by the model's own `get_rope_index` on each full,
  unpadded conversation and then sliced at the split, so the continuation sees exactly the positions it would see
  in the full sequence.
- Padding. Prefixes are left-padded (pads masked). Continuations of different lengths (edits of different sizes,
  different instructions) are left-padded too, which puts their pads *between* the cached prefix and the
  continuation; they are masked out and have explicit positions, so every row still ends on its real last token
  and edits of different sizes need no fallback. Samples whose source appears only once skip the two-pass path
  (nothing to share) and go through the one-forward path.
- The last decoder layer's MLP runs on the scored position only (its other positions are never read): about
  1/num_layers of the language model's MLP work saved on every path, with identical scores.
- Groups are detected automatically: two samples share a prefix when their source images have identical pixels (a
  content hash), whatever the instruction, because the instruction comes after both images.
- Lockstep (a judge sharded over ranks, e.g. by FSDP2). Every vision-tower and language-model call is then a
  collective, but how many calls a batch needs depends on its data (distinct sources, groups, chunks). `lockstep`, when
  set, maps this rank's (vision calls, language-model calls) to the maxima over the ranks, and the rank adds one-token
  dummy calls up to them, after its real calls of each kind; their outputs are dropped, so scores do not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from nftcore.ops import score_logits

from .base import RewardResult, check_batch, to_pil_list
from .prompt import DIGIT_RUBRIC, Rubric

# Rows (edited images) per language-model forward. A shared-prefix chunk also holds one prefix row per group.
DEFAULT_MAX_BATCH = 16
# Images per vision-tower call. Images never attend to each other there, so chunking changes no number; it bounds
# the tower's activations (its MLP runs on 4x as many patches as the language model sees tokens).
DEFAULT_VISION_BATCH = 4


def answer_token_ids(tokenizer, answers: Sequence[str]) -> list[int]:
    """The token id of each answer string; ValueError if one is not exactly one token (a multi-token answer has no
    single logit to read). With the Qwen2 vocabulary "0".."5" are 15..20 and "Yes"/"No" 9454/2753."""
    ids = []
    for a in answers:
        enc = tokenizer.encode(a, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"answer {a!r} is {len(enc)} tokens {enc} in this tokenizer; every answer must be one")
        ids.append(enc[0])
    return ids


def image_key(image) -> bytes:
    """Content hash of a PIL image (mode, size and pixels): equal keys mean the vision tower would see the same
    input, so samples sharing it can share the prefix."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.digest()


@dataclass
class _Sample:
    ids: list[int]  # the whole conversation, image pads expanded
    split: int  # index of the edited image's <|vision_start|>: ids[:split] is the shared prefix
    positions: torch.Tensor  # [3, len(ids)] MRoPE position ids of the whole conversation
    source: int  # index into the batch's distinct source images


class MLLMScorer:
    """Scores edits with a local Qwen2.5-VL judge. Build with `from_pretrained(folder)`; call `score(...)`."""

    def __init__(self, model, tokenizer, image_processor, *, rubric: Rubric = DIGIT_RUBRIC,
                 max_batch: int = DEFAULT_MAX_BATCH, vision_batch: int = DEFAULT_VISION_BATCH,
                 share_prefix: bool = True):
        self.model = model.eval()
        self.vision_batch = max(1, int(vision_batch))
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.rubric = rubric
        self.max_batch = max(1, int(max_batch))
        self.share_prefix = share_prefix
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.answer_ids = answer_token_ids(tokenizer, rubric.answers)
        vocab = self.lm_head_weight.shape[0]
        if max(self.answer_ids) >= vocab:
            raise ValueError(f"answer ids {self.answer_ids} do not fit the model's LM head ({vocab} rows): the "
                             "tokenizer does not belong to this model")
        self._values = torch.tensor(rubric.values, dtype=torch.float32)
        self._vmin, self._vmax = min(rubric.values), max(rubric.values)
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name still works, with a warning).
        lm_params = inspect.signature(model.model.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in lm_params else "past_key_values"
        self._rope_params = inspect.signature(model.model.get_rope_index).parameters
        self._text_ids: dict[str, list[int]] = {}
        # (vision calls, language-model calls) of this rank -> their maxima over the ranks sharing a sharded judge.
        self.lockstep: Callable[[tuple[int, int]], tuple[int, int]] | None = None
        self._dummy_image: tuple[torch.Tensor, torch.Tensor] | None = None  # (pixels, grid) for lockstep padding

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", min_pixels: int | None = None,
                        max_pixels: int | None = None, attn_implementation: str = "sdpa", **kwargs) -> "MLLMScorer":
        """Load model, tokenizer and the PIL image processor from a local Qwen2.5-VL folder.

        dtype: default bf16 on CUDA, fp32 elsewhere (bf16 matmuls are slow on most CPUs). min/max_pixels: the
        image processor's smart_resize bounds (stock: 56*56 .. 28*28*1280; 512x512 -> 324 tokens per image).
        device "meta": the model's shapes only, no weights read (a sharded judge's ranks other than 0, filled from
        rank 0 by `nftcore.trainer.inference_sharding.shard_judge`).
        Other kwargs (rubric, max_batch, vision_batch, share_prefix) go to the constructor.
        """
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        from nftcore.utils.qwen_vl import load_image_processor, load_tokenizer

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if device.type == "meta":
            with device:
                model = Qwen2_5_VLForConditionalGeneration._from_config(
                    AutoConfig.from_pretrained(str(folder)), dtype=dtype, attn_implementation=attn_implementation)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype, attn_implementation=attn_implementation).to(device)
        model.requires_grad_(False)
        tokenizer = load_tokenizer(folder)
        image_processor = load_image_processor(folder, min_pixels=min_pixels, max_pixels=max_pixels)
        return cls(model, tokenizer, image_processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    # ------------------------------------------------------------------------------------------------ scoring

    def score(self, edited_images, source_images, instructions: Sequence[str], requirements: Sequence[str | None],
              *, share_prefix: bool | None = None) -> torch.Tensor:
        """Scores in [0, 1], float32 [B] on CPU. `share_prefix` overrides the constructor's setting for this call
        (False: every sample through the one-forward path, e.g. as a reference)."""
        # no_grad, not inference_mode, for a sharded judge: FSDP2's unsharding into inference tensors fails on some
        # torch versions ("Inference tensors do not track version counter", pytorch/pytorch#197327).
        with torch.no_grad() if self.lockstep is not None else torch.inference_mode():
            return self._score(edited_images, source_images, instructions, requirements, share_prefix)

    def _score(self, edited_images, source_images, instructions, requirements, share_prefix) -> torch.Tensor:
        n = check_batch(edited_images, source_images, instructions, requirements)
        if n == 0 and self.lockstep is None:
            return torch.empty(0)
        edits, sources = to_pil_list(edited_images), to_pil_list(source_images)
        samples, (src_pix, src_grid), (edit_pix, edit_grid) = self._encode(edits, sources, instructions, requirements)
        share = self.share_prefix if share_prefix is None else share_prefix
        plan = list(self._plan(samples, share))
        vision_calls = math.ceil(len(src_pix) / self.vision_batch) + math.ceil(len(edit_pix) / self.vision_batch)
        lm_calls = sum(2 if kind == "shared" else 1 for kind, _ in plan)
        if self.lockstep is not None:
            vision_max, lm_max = self.lockstep((vision_calls, lm_calls))
        src_feat = self._image_features(src_pix, src_grid)  # each distinct source once, whatever the path
        edit_feat = self._image_features(edit_pix, edit_grid)
        if self.lockstep is not None:
            self._dummy_vision_calls(vision_max - vision_calls)
        hidden = [None] * n
        with self._last_layer_mlp_on_last_position():
            for kind, rows in plan:
                if kind == "shared":
                    h = self._forward_shared(rows, samples, src_feat, edit_feat)
                    flat = [i for group in rows for i in group]
                else:
                    h = self._forward_full(rows, samples, src_feat, edit_feat)
                    flat = rows
                for i, row in zip(flat, h):
                    hidden[i] = row
            if self.lockstep is not None:
                self._dummy_language_model_calls(lm_max - lm_calls)
        return self.score_hidden(torch.stack(hidden)) if n else torch.empty(0)

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] final-normed hidden states at the answer position -> [B] scores in [0, 1] (float32, CPU)."""
        logp = score_logits(hidden, self.lm_head_weight, self.answer_ids, mode="subset")  # [B, K] fp32
        expected = logp.exp() @ self._values.to(logp.device)
        return ((expected - self._vmin) / (self._vmax - self._vmin)).cpu()

    # ------------------------------------------------------------------------------------------------ encoding

    def conversation_text(self, instruction: str, requirement: str | None) -> str:
        """The chat-templated prompt with one placeholder per image (what a processor would be given)."""
        text = self.rubric.render(instruction, requirement)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _template_ids(self, instruction: str, requirement: str | None) -> list[int]:
        text = self.conversation_text(instruction, requirement)
        ids = self._text_ids.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            n_img = sum(t == self.image_token_id for t in ids)
            n_start = sum(t == self.vision_start_id for t in ids)
            if n_img != 2 or n_start != 2:
                raise ValueError(f"the prompt must hold exactly the two images' placeholders, found {n_img} image pads "
                                 f"and {n_start} <|vision_start|>: does the instruction or requirement contain "
                                 f"vision special tokens? instruction={instruction!r}")
            if len(self._text_ids) > 4096:  # unbounded growth in a long-running server is a leak
                self._text_ids.clear()
            self._text_ids[text] = ids
        return ids

    def _preprocess(self, images) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """PIL images -> per-image (pixel patches [P_i, D], grid_thw [3])."""
        if not images:
            return [], []
        out = self.image_processor(images=images, return_tensors="pt")
        grids = out["image_grid_thw"]
        pixels = torch.split(out["pixel_values"], grids.prod(-1).tolist())
        return list(pixels), list(grids)

    def _encode(self, edits, sources, instructions, requirements):
        keys: dict[bytes, int] = {}
        source_of = [keys.setdefault(image_key(img), len(keys)) for img in sources]
        first = {}
        for i, s in enumerate(source_of):
            first.setdefault(s, i)
        src_pix, src_grid = self._preprocess([sources[first[s]] for s in range(len(keys))])
        edit_pix, edit_grid = self._preprocess(edits)
        positions_cache: dict[tuple, torch.Tensor] = {}
        samples = []
        for i, s in enumerate(source_of):
            grids = (src_grid[s], edit_grid[i])
            counts = iter(int(g.prod()) // self.merge_size**2 for g in grids)
            ids = []
            for t in self._template_ids(instructions[i], requirements[i]):
                ids.extend([t] * next(counts) if t == self.image_token_id else [t])
            split = [j for j, t in enumerate(ids) if t == self.vision_start_id][1]
            key = (tuple(ids), tuple(grids[0].tolist()), tuple(grids[1].tolist()))
            if key not in positions_cache:
                positions_cache[key] = self._positions(ids, grids)
            samples.append(_Sample(ids, split, positions_cache[key], s))
        return samples, (src_pix, src_grid), (edit_pix, edit_grid)

    def _positions(self, ids: list[int], grids) -> torch.Tensor:
        """[3, L] MRoPE ids of one unpadded conversation, from the model's own `get_rope_index`."""
        input_ids = torch.tensor([ids])
        kwargs = {"input_ids": input_ids, "image_grid_thw": torch.stack(list(grids))}
        if "mm_token_type_ids" in self._rope_params:  # transformers >= 5.2x marks image tokens explicitly
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        position_ids, _ = self.model.model.get_rope_index(**kwargs)
        return position_ids[:, 0].cpu()

    # ------------------------------------------------------------------------------------------------ planning

    def _plan(self, samples: list[_Sample], share: bool):
        """Yield ("shared", [[rows of group], ...]) and ("full", [rows]) chunks of at most max_batch edits."""
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.source, []).append(i)
        singles = [i for g in groups.values() if not share or len(g) == 1 for i in g]
        shared = [g for g in groups.values() if share and len(g) > 1]
        for k in range(0, len(singles), self.max_batch):
            yield "full", singles[k:k + self.max_batch]
        chunk, rows = [], 0
        for g in shared:
            for k in range(0, len(g), self.max_batch):  # a group bigger than a chunk is split (prefix recomputed)
                part = g[k:k + self.max_batch]
                if rows + len(part) > self.max_batch and chunk:
                    yield "shared", chunk
                    chunk, rows = [], 0
                chunk.append(part)
                rows += len(part)
        if chunk:
            yield "shared", chunk

    # ------------------------------------------------------------------------------------------------ forwards

    def _pad_left(self, seqs: list[list[int]], positions: list[torch.Tensor]):
        """Left-pad token lists and their [3, L_i] positions to [B, L] ids, [B, L] mask, [3, B, L] positions."""
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        pos = torch.ones((3, B, L), dtype=torch.long)  # pads: any position (they are masked)
        for r, (s, p) in enumerate(zip(seqs, positions)):
            ids[r, L - len(s):] = torch.tensor(s)
            mask[r, L - len(s):] = 1
            pos[:, r, L - len(s):] = p
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev)

    def _image_features(self, pixels: list[torch.Tensor], grids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Vision tower + merger, `vision_batch` images per call: per image [tokens_i, H] language-model inputs."""
        visual = self.model.model.visual
        dtype = next(visual.parameters()).dtype
        feats = []
        for k in range(0, len(pixels), self.vision_batch):
            grid = torch.stack(grids[k:k + self.vision_batch]).to(self.device)
            out = visual(torch.cat(pixels[k:k + self.vision_batch]).to(self.device, dtype), grid_thw=grid)
            merged = getattr(out, "pooler_output", out)  # transformers 5 returns an output object, 4.x the tensor
            feats += torch.split(merged, (grid.prod(-1) // self.merge_size**2).tolist())
        return feats

    def _language_model(self, ids, mask, pos, feats: list[torch.Tensor], **kwargs) -> torch.Tensor:
        """Token embeddings with the image features scattered over the image pads (in row-major order), through the
        language model (no LM head): [B, L, H] final-normed hidden states.

        The features are scattered by a hook on the embedding inside the language model's own forward (not by
        embedding first and passing `inputs_embeds`), so that a sharded language model gathers its embedding table
        itself: the embedding is then part of the language model's shard group."""
        image_pos = ids == self.image_token_id
        n_features = sum(f.shape[0] for f in feats)
        if n_features != int(image_pos.sum()):
            raise AssertionError(f"{n_features} image features for {int(image_pos.sum())} image tokens")

        def scatter(module, args, embeds):
            if feats:
                embeds[image_pos] = torch.cat(feats).to(embeds.dtype)
            return embeds

        handle = self.model.model.get_input_embeddings().register_forward_hook(scatter)
        try:
            out = self.model.model.language_model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        finally:
            handle.remove()
        return out.last_hidden_state

    def _forward_full(self, rows, samples, src_feat, edit_feat) -> torch.Tensor:
        """The one-forward path: whole conversations, left-padded; the hidden state of each row's last token."""
        ids, mask, pos = self._pad_left([samples[i].ids for i in rows], [samples[i].positions for i in rows])
        feats = [f for i in rows for f in (src_feat[samples[i].source], edit_feat[i])]
        return self._language_model(ids, mask, pos, feats, use_cache=False)[:, -1]

    def _forward_shared(self, groups, samples, src_feat, edit_feat) -> torch.Tensor:
        """The shared-prefix path: prefixes once per group, then every edit's continuation on the gathered cache."""
        heads = [samples[g[0]] for g in groups]
        for g, h in zip(groups, heads):
            if any(samples[i].ids[:h.split] != h.ids[:h.split] for i in g[1:]):
                raise AssertionError("samples grouped by source image have different prefixes")
        ids, mask, pos = self._pad_left([h.ids[:h.split] for h in heads], [h.positions[:, :h.split] for h in heads])
        cache = self._new_cache()
        self._language_model(ids, mask, pos, [src_feat[h.source] for h in heads], use_cache=True,
                             **{self._cache_kw: cache})
        row_group = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=self.device)
        cache.batch_select_indices(row_group)  # [G, ...] -> one cached prefix row per edit
        rows = [i for g in groups for i in g]
        s_ids, s_mask, s_pos = self._pad_left([samples[i].ids[samples[i].split:] for i in rows],
                                              [samples[i].positions[:, samples[i].split:] for i in rows])
        full_mask = torch.cat([mask.index_select(0, row_group), s_mask], dim=1)
        hidden = self._language_model(s_ids, full_mask, s_pos, [edit_feat[i] for i in rows], use_cache=True,
                                      **{self._cache_kw: cache})
        return hidden[:, -1]

    def _dummy_vision_calls(self, count: int) -> None:
        """`count` vision-tower calls on the smallest image the processor makes (lockstep padding; output dropped)."""
        if count <= 0:
            return
        if self._dummy_image is None:
            from PIL import Image

            pixels, grids = self._preprocess([Image.new("RGB", (2 * 14, 2 * 14))])  # resized up to min_pixels
            self._dummy_image = pixels[0], grids[0]
        pixels, grid = self._dummy_image
        for _ in range(count):
            self._image_features([pixels], [grid])

    def _dummy_language_model_calls(self, count: int) -> None:
        """`count` one-token language-model calls (lockstep padding; output dropped)."""
        for _ in range(count):
            ids, mask, pos = self._pad_left([[self.pad_id]], [torch.zeros((3, 1), dtype=torch.long)])
            self._language_model(ids, mask, pos, [], use_cache=False)

    @contextlib.contextmanager
    def _last_layer_mlp_on_last_position(self):
        """Run the last decoder layer's MLP on the last position only.

        Only the last position's final hidden state is read, and nothing reads the last layer's outputs at other
        positions (its keys/values come from its *input*), so their MLP - most of that layer's FLOPs - is wasted
        work. A pre-hook on the layer's `post_attention_layernorm` hands the norm (and so the MLP) only [B, 1, H];
        the layer's `residual + mlp(...)` then broadcasts, which is exact at the last position and garbage, never
        read, elsewhere. The tests' equality with `model(...)` would catch a layer that stops being pre-norm
        residual. Skipped when the module path differs (other transformers layouts).
        """
        try:
            norm = self.model.model.language_model.layers[-1].post_attention_layernorm
        except AttributeError:
            yield
            return
        handle = norm.register_forward_pre_hook(
            lambda module, args: (args[0][:, -1:], *args[1:]) if args and args[0].dim() == 3 else None)
        try:
            yield
        finally:
            handle.remove()

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()


class MLLMReward:
    """The scorer as a reward: `requirement` comes from each sample's metadata dict (Edit-R1's per-sample task
    prompt). A non-finite score (e.g. a bf16 overflow) is reported invalid, never as a number."""

    def __init__(self, scorer: MLLMScorer, *, requirement_key: str = "requirement"):
        self.scorer = scorer
        self.requirement_key = requirement_key

    def __call__(self, edited, sources, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardResult:
        check_batch(edited, sources, prompts, metadata)
        missing = [i for i, m in enumerate(metadata) if self.requirement_key not in m]
        if missing:
            raise ValueError(f"metadata of samples {missing} has no {self.requirement_key!r} field")
        requirements = [m[self.requirement_key] for m in metadata]
        return RewardResult.from_scores(self.scorer.score(edited, sources, prompts, requirements))
