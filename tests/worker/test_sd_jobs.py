"""sd.txt2img, sd.img2img and sd.sweep through the real Executor, in process, on the
tiny random-weight SD pipeline (32 px images): outputs, manifest and PNG metadata,
seed invariance across batching, real sub-1 guidance, the model cache, uploads."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from shared.db import make_engine, make_sessionmaker
from shared.storage import make_storage
from shared.uploads import save_upload
from tests.upload_files import png_bytes

BASE = {"model": "tiny-sd", "steps": 3, "width": 32, "height": 32}


def pixels(job, name: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(job.read(name))), dtype=np.int16)


def upload(settings, tmp_path, filename: str, data: bytes) -> str:
    path = tmp_path / filename
    path.write_bytes(data)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    return save_upload(sessions, make_storage(settings), settings, filename, path).id


def test_txt2img_outputs_manifest_and_metadata(run_inline, tiny_sd_dir):
    job = run_inline("sd.txt2img", {**BASE, "prompts": ["a watercolor rose", "a red fox"], "num_images_per_prompt": 2,
                                    "negative_prompt": ["blurry", "dark"], "seed": 10, "batch_size": 3})
    assert job.status == "succeeded", job.traceback
    names = sorted(a.name for a in job.artifacts if a.name.startswith("images/"))
    assert names == ["images/0000-00.png", "images/0000-01.png", "images/0001-00.png", "images/0001-01.png"]
    manifest = json.loads(job.read("manifest.json"))
    by_name = {r["name"]: r for r in manifest["images"]}
    # Seeds: seed + prompt index * images per prompt + image index.
    assert [by_name[n]["seed"] for n in names] == [10, 11, 12, 13]
    assert by_name["images/0001-00.png"]["prompt"] == "a red fox"
    assert by_name["images/0001-00.png"]["negative_prompt"] == "dark"
    image = Image.open(io.BytesIO(job.read("images/0001-01.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "13" and image.text["steps"] == "3"
    grid = Image.open(io.BytesIO(job.read("grid.png")))
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # a row per prompt
    assert job.result["num_images"] == 4 and job.result["model_cache"] == "miss"
    assert job.progress_step == job.progress_total  # every denoising step counted
    assert any(a.name.startswith("previews/step-") for a in job.artifacts)


def test_second_job_uses_the_warm_pipeline(run_inline, tiny_sd_dir):
    first = run_inline("sd.txt2img", {**BASE, "prompts": ["a rose"]})
    second = run_inline("sd.sweep", {**BASE, "prompt": "a rose", "guidance_scales": [2.0]})
    assert (first.result["model_cache"], second.result["model_cache"]) == ("miss", "hit")


def test_an_image_is_the_same_alone_in_a_batch_and_as_a_sweep_cell(run_inline, tiny_sd_dir):
    alone = run_inline("sd.txt2img", {**BASE, "prompts": ["a rose"], "seed": 5, "guidance_scale": 4.0,
                                      "batch_size": 1})
    batched = run_inline("sd.txt2img", {**BASE, "prompts": ["a rose", "a fox", "a boat"], "seed": 5,
                                        "guidance_scale": 4.0, "batch_size": 3})
    cell = run_inline("sd.sweep", {**BASE, "prompt": "a rose", "guidance_scales": [1.0, 4.0, 9.0], "seeds": [5],
                                   "batch_size": 3})
    reference = pixels(alone, "images/0000-00.png")
    assert np.abs(pixels(batched, "images/0000-00.png") - reference).max() <= 1
    assert np.abs(pixels(cell, "images/g4_s5.png") - reference).max() <= 1
    # And a different seed is a different image.
    other = run_inline("sd.txt2img", {**BASE, "prompts": ["a rose"], "seed": 6, "guidance_scale": 4.0})
    assert np.abs(pixels(other, "images/0000-00.png") - reference).mean() > 5


def louder_text(model_dir) -> None:
    """Random weights barely let the text steer the UNet; scale the text encoder's
    output so guidance differences are large enough to see in 8-bit pixels."""
    import torch
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    with torch.no_grad():
        encoder.final_layer_norm.weight.mul_(30)
    encoder.save_pretrained(model_dir / "text_encoder")


def test_sweep_guidance_below_one_is_real(run_inline, tiny_sd_dir):
    louder_text(tiny_sd_dir)
    job = run_inline("sd.sweep", {**BASE, "prompt": "a rose", "negative_prompt": "fog",
                                  "guidance_scales": [0.25, 0.5, 1.0], "seeds": [193, 7], "steps_list": [2, 3],
                                  "batch_size": 4})
    assert job.status == "succeeded", job.traceback
    cells = {a.name for a in job.artifacts if a.name.startswith("images/")}
    assert len(cells) == 3 * 2 * 2 and "images/g0.25_s193_n2.png" in cells and "images/g1_s7_n3.png" in cells
    a, b, c = (pixels(job, f"images/g{g}_s193_n3.png") for g in ("0.25", "0.5", "1"))
    # diffusers' pipelines turn guidance off at g <= 1, which would make these three equal.
    assert np.abs(a - b).mean() > 0.3 and np.abs(b - c).mean() > 0.3 and np.abs(a - c).mean() > 0.6
    grid = Image.open(io.BytesIO(job.read("grid.png")))
    assert grid.width > 3 * 32 and grid.height > 4 * 32  # 3 columns, 4 rows, plus the legends
    manifest = json.loads(job.read("manifest.json"))
    assert manifest["axes"] == {"guidance_scales": [0.25, 0.5, 1.0], "seeds": [193, 7], "steps": [2, 3]}


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "euler_a", "dpm++"])
def test_every_scheduler_renders(run_inline, tiny_sd_dir, scheduler):
    job = run_inline("sd.sweep", {**BASE, "prompt": "a rose", "guidance_scales": [7.5], "scheduler": scheduler})
    assert job.status == "succeeded", job.traceback
    assert pixels(job, "images/g7.5_s193.png").shape == (32, 32, 3)


def test_img2img_from_an_upload_and_from_a_job_artifact(run_inline, tiny_sd_dir, sqlite_settings, tmp_path):
    ref = upload(sqlite_settings, tmp_path, "init.png", png_bytes(64, 32, color=(200, 40, 40)))
    job = run_inline("sd.img2img", {**BASE, "init_image": f"upload:{ref}", "prompts": ["a red barn"],
                                    "num_images_per_prompt": 2, "strength": 0.5, "steps": 4,
                                    "scheduler": "ddim"})
    assert job.status == "succeeded", job.traceback
    image = Image.open(io.BytesIO(job.read("images/0000-01.png")))
    assert image.size == (32, 16)  # 64x32 fitted into 32x32, aspect kept
    assert image.text["strength"] == "0.5"
    assert job.progress_total == 2  # strength 0.5 of 4 steps
    # Low strength keeps the init image's colour; the two images differ by seed.
    assert pixels(job, "images/0000-00.png")[..., 0].mean() > pixels(job, "images/0000-00.png")[..., 2].mean()
    assert np.abs(pixels(job, "images/0000-00.png") - pixels(job, "images/0000-01.png")).mean() > 0

    again = run_inline("sd.img2img", {**BASE, "init_image": f"job:{job.id}/images/0000-00.png",
                                      "prompts": ["a blue barn"], "strength": 1.0})
    assert again.status == "succeeded", again.traceback
    assert Image.open(io.BytesIO(again.read("images/0000-00.png"))).size == (32, 16)


def test_prompts_from_an_uploaded_csv(run_inline, tiny_sd_dir, sqlite_settings, tmp_path):
    csv_text = "prompt,negative_prompt,seed\na rose,blurry,42\na fox,,\n"
    ref = upload(sqlite_settings, tmp_path, "prompts.csv", csv_text.encode())
    job = run_inline("sd.txt2img", {**BASE, "prompts_upload": f"upload:{ref}", "negative_prompt": "ugly", "seed": 3})
    assert job.status == "succeeded", job.traceback
    records = json.loads(job.read("manifest.json"))["images"]
    assert [(r["prompt"], r["negative_prompt"], r["seed"]) for r in records] == [
        ("a rose", "blurry", 42), ("a fox", "ugly", 4)]


def test_long_prompts_are_reported_as_truncated(run_inline, tiny_sd_dir):
    long_prompt = " ".join(["rose"] * 120)
    job = run_inline("sd.txt2img", {**BASE, "prompts": ["short", long_prompt]})
    assert job.status == "succeeded", job.traceback
    [warning] = job.result["warnings"]
    assert warning.startswith("prompt 1 is ") and "CLIP reads the first 77" in warning
    assert json.loads(job.read("manifest.json"))["warnings"] == [warning]


def test_unknown_models_fail_fast_and_clearly(run_inline, tiny_sd_dir, monkeypatch):
    import huggingface_hub.constants

    job = run_inline("sd.txt2img", {**BASE, "model": "no-such-model", "prompts": ["a rose"]})
    assert job.status == "failed" and "'no-such-model' is not a folder under DIFFQUEUE_MODELS_DIR" in job.error
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    job = run_inline("sd.txt2img", {**BASE, "model": "nobody/no-such-sd", "prompts": ["a rose"]})
    assert job.status == "failed"
    assert "model nobody/no-such-sd could not be loaded from the Hugging Face hub" in job.error


def pickle_only(component_dir, filename: str) -> None:
    """Leave a component with its weights only as a pickle, as save_pretrained(safe_serialization=False)
    writes them (transformers 5 can no longer write that format, so it is done by hand)."""
    import torch
    from safetensors.torch import load_file

    [weights] = component_dir.glob("*.safetensors")
    torch.save(load_file(weights), component_dir / filename)
    weights.unlink()


@pytest.mark.parametrize("component, filename", [
    ("unet", "diffusion_pytorch_model.bin"),
    ("vae", "diffusion_pytorch_model.bin"),
    ("text_encoder", "pytorch_model.bin"),
])
def test_a_component_with_pickled_weights_fails_the_job_naming_it(run_inline, tiny_sd_dir, component, filename):
    pickle_only(tiny_sd_dir / component, filename)
    job = run_inline("sd.txt2img", {**BASE, "prompts": ["a rose"]})
    assert job.status == "failed" and not job.artifacts
    assert (f"UnsafeWeights: model tiny-sd: its weights are pickled ({component}/{filename}), and only safetensors "
            "weights are loaded") in job.error


def test_a_pickled_replacement_vae_fails_the_job_naming_it(run_inline, tiny_sd_dir):
    import shutil

    shutil.copytree(tiny_sd_dir / "vae", tiny_sd_dir.parent / "tiny-vae")
    pickle_only(tiny_sd_dir.parent / "tiny-vae", "diffusion_pytorch_model.bin")
    job = run_inline("sd.txt2img", {**BASE, "vae": "tiny-vae", "prompts": ["a rose"]})
    assert job.status == "failed"
    assert ("UnsafeWeights: vae tiny-vae: its weights are pickled (diffusion_pytorch_model.bin), and only safetensors "
            "weights are loaded") in job.error


def test_a_moved_hub_id_loads_its_copy_and_the_result_says_so(run_inline, tiny_sd_dir, sqlite_settings):
    """runwayml/stable-diffusion-v1-5 is gone from the hub; it resolves to its community
    copy, here a folder of that name in the models dir (the hub cannot be reached)."""
    import shutil

    copy = sqlite_settings.models_dir / "stable-diffusion-v1-5" / "stable-diffusion-v1-5"
    shutil.copytree(tiny_sd_dir, copy)
    old = "runwayml/stable-diffusion-v1-5"
    job = run_inline("sd.txt2img", {**BASE, "model": old, "prompts": ["a rose"]})
    assert job.status == "succeeded", job.traceback
    assert job.result["model_aliases"] == {old: "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert any(old in w and "stable-diffusion-v1-5/stable-diffusion-v1-5" in w for w in job.result["warnings"])
    assert job.params["model"] == old  # what was asked stays on the job
    assert Image.open(io.BytesIO(job.read("images/0000-00.png"))).size == (32, 32)
