"""Tiny random diffusers pipeline folders, built offline: Qwen-Image-Edit(-Plus) and FLUX.1-Kontext.

Used by the family, trainer, cache and editing tests on the real families and by bench/bench_epoch.py's edit configs.
Each builder writes the released layout into `folder` (model_index.json, scheduler/, vae/, text encoder(s) +
tokenizer(s) or processor/, transformer/) in well under a second, apart from the first call of `qwen_tokenizer()` (the
real 151k-token vocabulary, cached per process).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nftcore.testing.tiny_judge import TEST_MAX_PIXELS, TEST_MIN_PIXELS, build_tiny_judge, qwen_tokenizer

QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                      num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                      use_dynamic_shifting=True)
KONTEXT_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                         use_dynamic_shifting=True)
CORPUS = ["make the sky blue", "add a hat to the dog", "remove the cat from the sofa and keep everything else",
          "turn the photo into a watercolor painting", "replace the red car with a green bicycle"] * 4


def randomize(model, seed, scale=0.3):
    """Random weights, small biases, norm gains near 1: the output then depends on the tokens (text, source) and
    not mainly on bias-driven modulation, so a parity test of the conditioning is not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * scale if p.dim() > 1 else noise * 0.02 if name.endswith("bias") else 1 + 0.1 * noise)
    return model


def build_qwen_edit_pipeline(folder: str | Path, class_name: str = "QwenImageEditPipeline") -> Path:
    """A tiny random Qwen-Image-Edit pipeline in the released layout (processor/ = tokenizer + image processor);
    `class_name` "QwenImageEditPlusPipeline" makes it a -2509 (Plus) folder."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from nftcore.utils.qwen_vl import build_image_processor, save_qwen_vl_processor

    folder = Path(folder)
    tok = qwen_tokenizer()
    torch.manual_seed(0)
    build_tiny_judge(tok).save_pretrained(folder / "text_encoder")  # hidden 64 = joint_attention_dim
    save_qwen_vl_processor(folder / "processor", tok, build_image_processor(TEST_MIN_PIXELS, TEST_MAX_PIXELS))
    torch.manual_seed(1)
    AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).save_pretrained(folder / "vae")
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                              axes_dims_rope=(4, 6, 6))
    randomize(transformer, 2).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def clip_tokenizer():
    """A tiny byte-level BPE with CLIP's special tokens, bos/eos added around every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>",
                                                                                         "<|endoftext|>"]))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


def t5_tokenizer():
    """A tiny Unigram with T5's special tokens (`<pad>` = 0, `</s>` appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>",
                                                                                         tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)


def build_kontext_pipeline(folder: str | Path) -> Path:
    """A tiny random FLUX.1-Kontext pipeline: CLIP (tokenizer/, text_encoder/), T5 (tokenizer_2/,
    text_encoder_2/), FLUX VAE, a transformer with a guidance embedding, the dynamic-shift scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_tok.save_pretrained(folder / "tokenizer")
    t5_tok.save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                 pad_token_id=clip_tok.pad_token_id)).save_pretrained(folder / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(folder / "text_encoder_2")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder / "vae")
    transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         in_channels=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    randomize(transformer, 3).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    return folder
