"""Stable Diffusion pipelines built from configs with random weights: real component
classes and the real loading code, no download. A small one for the tests
(tests/conftest.py `tiny_sd_dir`) and the CPU benchmark (bench/sd_cpu.py); one of
SD 1.5's size for the GPU benchmark (bench/sd_gpu.py), whose machines cannot download.
"""
from __future__ import annotations

import json
from pathlib import Path


# A byte-level BPE vocabulary as CLIP's tokenizer reads it: every byte's printable
# stand-in, with and without the end-of-word suffix, a few merges, and the two
# special tokens last (as in CLIP, so the end-of-text token has the highest id).
TINY_CLIP_MERGES = ["r o", "ro s", "ros e</w>", "w a", "t e", "o r</w>"]


def byte_level_chars() -> list[str]:
    """The 256 characters that stand for the bytes 0..255 (GPT-2/CLIP's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [chars[b] for b in range(256)]


def write_tiny_clip_tokenizer_files(folder: Path) -> int:
    """vocab.json and merges.txt for a tiny CLIP tokenizer; returns the vocabulary size."""
    chars = byte_level_chars()
    merged = ["".join(m.split()) for m in TINY_CLIP_MERGES]
    tokens = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_CLIP_MERGES) + "\n")
    return len(tokens)


def build_sd_pipeline(path: Path, base_channels: int = 32) -> Path:
    """A random-weight StableDiffusionPipeline of the real component classes: UNet
    (base, 2 x base) with cross-attention at the lower level, a two-block VAE (scale
    factor 2: 32 px images have 16 px latents), a 2-layer CLIP text encoder of width
    32, and PNDM with SD's betas. At base 32 it builds in well under a second (tests)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return _build(
        path,
        unet=lambda: UNet2DConditionModel(
            block_out_channels=(base_channels, 2 * base_channels), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
        ),
        vae=lambda: AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    )


def build_sd15_pipeline(path: Path) -> Path:
    """Stable Diffusion 1.5's architecture with random weights, saved in float16: its
    UNet (860 M parameters: 320/640/1280/1280 channels, cross-attention width 768), VAE
    (128/256/512/512, 8x) and CLIP ViT-L/14 text encoder (12 layers of 768). The same
    compute as the real model, for GPU benchmarks on machines that cannot download it.
    The tokenizer is the tiny one: the text encoder's cost does not depend on it."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return _build(
        path,
        unet=lambda: UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        ),
        vae=lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            latent_channels=4, sample_size=512, norm_num_groups=32,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=768),
        dtype=torch.float16,
    )


def _build(path: Path, unet, vae, text: dict, dtype=None) -> Path:
    """Assemble and save a StableDiffusionPipeline: the tiny tokenizer, the given UNet,
    VAE and CLIP text encoder sizes, and PNDM with SD's betas."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab_size = write_tiny_clip_tokenizer_files(path.parent / f"{path.name}-tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(path.parent / f"{path.name}-tokenizer-src", model_max_length=77)
    torch.manual_seed(0)
    unet, vae = unet(), vae()  # this order, then the text encoder: the tests' weights stay as they were
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-05, vocab_size=vocab_size, max_position_embeddings=77, **text,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(path)
    return path
