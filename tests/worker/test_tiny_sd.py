"""The tiny Stable Diffusion fixture loads and runs through diffusers' own loader and
pipeline, so SD runner tests stand on a real (if random-weight) pipeline folder."""
from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline


def generate(pipe, seed: int):
    return pipe("a rose", num_inference_steps=2, height=32, width=32, output_type="pil",
                generator=torch.Generator().manual_seed(seed)).images


def test_tiny_sd_folder_is_a_saved_pipeline(tiny_sd_dir, sqlite_settings):
    assert tiny_sd_dir == sqlite_settings.models_dir / "tiny-sd"
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_dir / part).is_dir(), part


def test_tiny_sd_loads_and_generates_deterministically(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"

    tokens = pipe.tokenizer("a watercolor rose", padding="max_length", max_length=77)
    assert pipe.tokenizer.model_max_length == 77 and len(tokens.input_ids) == 77
    assert tokens.input_ids[0] == pipe.tokenizer.bos_token_id
    assert "rose</w>" in pipe.tokenizer.convert_ids_to_tokens(tokens.input_ids)  # a merge applied
    embeddings = pipe.text_encoder(torch.tensor([tokens.input_ids]))[0]
    assert embeddings.shape == (1, 77, 32)

    images = generate(pipe, 0)
    assert len(images) == 1
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    again, other = generate(pipe, 0)[0], generate(pipe, 1)[0]
    assert np.array_equal(np.asarray(images[0]), np.asarray(again))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other))


def test_tiny_sd_build_is_deterministic(tiny_sd_dir, tmp_path):
    from bench.tiny_sd import build_sd_pipeline

    rebuilt = build_sd_pipeline(tmp_path / "again")
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
        assert (rebuilt / weights).read_bytes() == (tiny_sd_dir / weights).read_bytes(), weights
