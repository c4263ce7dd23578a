"""ddpm.sample, run in process through the real Executor on tiny random-weight models:
per-image seeds, class labels, previews, colour guidance, hub ids offline, spec errors."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import SpecError
from shared.specs import validate_params

TARGET = [0.1, 0.5, 0.9]  # the book's colour


def pixels(job, name: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(job.read(name))))


def succeeded(job):
    assert job.status == "succeeded", f"{job.error}\n{job.traceback}"
    return job


@pytest.fixture
def class_ddpm(sqlite_settings):
    """A tiny class-conditioned 1-channel DDPMPipeline with class_names.json, under
    MODELS_DIR as `acme/tiny-classes` (an org/name that is a local folder, not the hub)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3)
    path = Path(sqlite_settings.models_dir) / "acme" / "tiny-classes"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    (path / "class_names.json").write_text(json.dumps(["cat", "dog", "cow"]))
    return "acme/tiny-classes"


# ------------------------------------------------------------------ seeds
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_image_i_is_the_same_whatever_the_batch_size(run_inline, tiny_ddpm_dir, scheduler):
    params = {"model": "tiny-ddpm", "num_images": 4, "steps": 4, "scheduler": scheduler, "seed": 7}
    one = succeeded(run_inline("ddpm.sample", {**params, "batch_size": 1}))
    four = succeeded(run_inline("ddpm.sample", {**params, "batch_size": 4}))
    three = succeeded(run_inline("ddpm.sample", {**params, "batch_size": 3}))
    for i in range(4):
        name = f"images/{i:04d}.png"
        assert np.array_equal(pixels(one, name), pixels(four, name)), name
        assert np.array_equal(pixels(one, name), pixels(three, name)), name
    assert not np.array_equal(pixels(one, "images/0000.png"), pixels(one, "images/0001.png"))
    # seed + i: image 1 of seed 7 is image 0 of seed 8.
    shifted = succeeded(run_inline("ddpm.sample", {**params, "num_images": 1, "seed": 8}))
    assert np.array_equal(pixels(shifted, "images/0000.png"), pixels(one, "images/0001.png"))
    assert one.result == {"num_images": 4, "image_size": [16, 16], "device": "cpu", "scheduler": scheduler,
                          "steps": 4, "model": "tiny-ddpm", "model_source": "local", "guided": False}
    meta = Image.open(io.BytesIO(one.read("images/0002.png"))).text
    assert meta["seed"] == "7" and meta["image_seed"] == "9" and meta["index"] == "2"
    assert meta["scheduler"] == scheduler and meta["steps"] == "4" and meta["guidance"] == "none"


# ------------------------------------------------------------------ class labels
def test_class_labels_by_number_and_by_name(run_inline, class_ddpm):
    base = {"model": class_ddpm, "num_images": 3, "steps": 3, "seed": 1}
    by_name = succeeded(run_inline("ddpm.sample", {**base, "class_label": ["cow", "cat", "dog"]}))
    by_number = succeeded(run_inline("ddpm.sample", {**base, "class_label": [2, 0, 1]}))
    assert by_name.result["model_source"] == "local"
    for i, (label, name) in enumerate([("2", "cow"), ("0", "cat"), ("1", "dog")]):
        meta = Image.open(io.BytesIO(by_name.read(f"images/{i:04d}.png"))).text
        assert (meta["class_label"], meta["class_name"]) == (label, name)
        assert np.array_equal(pixels(by_name, f"images/{i:04d}.png"), pixels(by_number, f"images/{i:04d}.png"))
    # One label applies to every image; the label changes the image (same seed).
    dogs = succeeded(run_inline("ddpm.sample", {**base, "class_label": "dog"}))
    assert [Image.open(io.BytesIO(dogs.read(f"images/{i:04d}.png"))).text["class_label"] for i in range(3)] == ["1"] * 3
    assert np.array_equal(pixels(dogs, "images/0002.png"), pixels(by_number, "images/0002.png"))
    assert not np.array_equal(pixels(dogs, "images/0000.png"), pixels(by_number, "images/0000.png"))


@pytest.mark.parametrize(
    "class_label, fragment",
    [(3, "class_label 3 out of range: model acme/tiny-classes has classes 0..2"),
     ("horse", "class_label 'horse' is not a class of model acme/tiny-classes: its classes are cat, dog, cow")],
)
def test_bad_class_label_fails_the_job_naming_it(run_inline, class_ddpm, class_label, fragment):
    job = run_inline("ddpm.sample", {"model": class_ddpm, "num_images": 2, "steps": 2, "class_label": class_label})
    assert job.status == "failed" and fragment in job.error


def test_class_label_on_an_unconditional_model_fails(run_inline, tiny_ddpm_dir):
    job = run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 1, "steps": 1, "class_label": 1})
    assert job.status == "failed" and "not class-conditioned" in job.error


# ------------------------------------------------------------------ previews
def test_previews_every_n_steps_and_at_the_last(run_inline, tiny_ddpm_dir, client):
    job = succeeded(run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 4, "batch_size": 2, "steps": 10,
                                               "preview_every": 3}))
    previews = sorted(a.name for a in job.artifacts if a.name.startswith("previews/"))
    # First batch only: steps 3, 6, 9 and the last, 10.
    assert previews == ["previews/step-0003.png", "previews/step-0006.png", "previews/step-0009.png",
                        "previews/step-0010.png"]
    assert job.read("preview.png") == job.read("previews/step-0010.png")  # the latest
    figure = Image.open(io.BytesIO(job.read("previews/step-0006.png")))
    assert figure.text["step"] == "6" and figure.text["of"] == "10"

    # x beside the predicted x0: twice the first batch's grid, plus the gap between them.
    from worker.diffusion import PREVIEW_GAP_PX, make_grid

    first_batch = [Image.open(io.BytesIO(job.read(f"images/{i:04d}.png"))) for i in range(2)]
    grid = make_grid(first_batch)
    assert figure.size == (2 * grid.width + PREVIEW_GAP_PX, grid.height)
    # At the last step x is the final sample: the left half is the first batch's grid.
    last = np.asarray(Image.open(io.BytesIO(job.read("previews/step-0010.png"))).convert("RGB"))
    assert np.array_equal(last[:, : grid.width], np.asarray(grid.convert("RGB")))

    body = client.get(f"/api/v1/jobs/{job.id}").get_json()
    assert body["progress"]["preview"]["name"] == "previews/step-0010.png"
    assert body["progress"]["preview"]["url"].endswith(f"/api/v1/jobs/{job.id}/artifacts/previews/step-0010.png")


def test_default_preview_interval_is_an_eighth_of_the_steps(run_inline, tiny_ddpm_dir):
    job = succeeded(run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 1, "steps": 17}))
    previews = sorted(a.name for a in job.artifacts if a.name.startswith("previews/"))
    assert previews == [f"previews/step-{s:04d}.png" for s in (2, 4, 6, 8, 10, 12, 14, 16, 17)]


# ------------------------------------------------------------------ colour guidance
def mean_color_distance(job, n: int) -> float:
    """Mean over images of the distance of the image's mean colour (in [0, 1]) to TARGET."""
    colors = [pixels(job, f"images/{i:04d}.png").reshape(-1, 3).mean(axis=0) / 255 for i in range(n)]
    return float(np.mean([np.abs(c - np.array(TARGET)).mean() for c in colors]))


def test_color_guidance_pulls_the_images_toward_the_colour(run_inline, tiny_ddpm_dir):
    params = {"model": "tiny-ddpm", "num_images": 4, "steps": 10, "seed": 3}
    plain = succeeded(run_inline("ddpm.sample", params))
    guided = succeeded(run_inline("ddpm.sample", {**params, "guidance": {"color": TARGET}}))
    before, after = mean_color_distance(plain, 4), mean_color_distance(guided, 4)
    # Measured on this model: 0.22 unguided, 0.11 guided.
    assert after < 0.7 * before and after < before - 0.05, (before, after)
    assert guided.result["guided"] is True and plain.result["guided"] is False
    meta = Image.open(io.BytesIO(guided.read("images/0000.png"))).text
    assert json.loads(meta["guidance"]) == {"color": TARGET, "scale": 40.0}


def test_color_guidance_needs_one_value_per_channel(run_inline, tiny_ddpm_dir, class_ddpm):
    job = run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 1, "steps": 2, "guidance": {"color": [0.5]}})
    assert job.status == "failed"
    assert "guidance.color has 1 values but model tiny-ddpm has 3 channels: give [r, g, b]" in job.error
    job = run_inline("ddpm.sample", {"model": class_ddpm, "num_images": 1, "steps": 2, "guidance": {"color": TARGET}})
    assert job.status == "failed" and "has 1 channel: give [grey]" in job.error
    grey = run_inline("ddpm.sample", {"model": class_ddpm, "num_images": 1, "steps": 2,
                                      "guidance": {"color": [0.9], "scale": 10}})
    succeeded(grey)


# ------------------------------------------------------------------ hub ids
def test_hub_id_offline_fails_fast_with_a_clear_message(run_inline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    job = run_inline("ddpm.sample", {"model": "google/diffqueue-no-such-model", "num_images": 1, "steps": 1})
    assert time.monotonic() - started < 10
    assert job.status == "failed"
    assert ("model google/diffqueue-no-such-model could not be loaded from the Hugging Face hub "
            "(offline or unknown id): ") in job.error


def test_hub_id_unknown_to_the_hub_fails_with_a_clear_message(run_inline, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def model_info(repo_id, **kw):  # what the hub answers for an unknown id
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    job = run_inline("ddpm.sample", {"model": "google/diffqueue-no-such-model", "num_images": 1, "steps": 1})
    assert job.status == "failed"
    assert ("model google/diffqueue-no-such-model could not be loaded from the Hugging Face hub (offline or unknown "
            "id): RepositoryNotFoundError: 404 Repository Not Found") in job.error


def offline_hub_cache_with(repo_id: str, folder: Path, monkeypatch, tmp_path) -> None:
    """`folder` as hub repo `repo_id` in a Hugging Face cache of this test's own, with HF_HUB_OFFLINE=1."""
    import shutil

    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_offline_loads_from_the_hf_cache(run_inline, tiny_ddpm_dir, monkeypatch, tmp_path):
    """A hub pipeline already in the Hugging Face cache samples with HF_HUB_OFFLINE=1."""
    offline_hub_cache_with("acme/cached-ddpm", tiny_ddpm_dir, monkeypatch, tmp_path)
    job = succeeded(run_inline("ddpm.sample", {"model": "acme/cached-ddpm", "num_images": 2, "steps": 2}))
    assert job.result["model_source"] == "hub" and job.result["image_size"] == [16, 16]
    local = succeeded(run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 2, "steps": 2}))
    assert np.array_equal(pixels(job, "images/0001.png"), pixels(local, "images/0001.png"))


def test_hub_id_resolution_order(sqlite_settings):
    from worker.context import JobContext

    ctx = JobContext(sqlite_settings, None, None, "0" * 32, 1, None)
    (Path(sqlite_settings.models_dir) / "acme" / "local").mkdir(parents=True)
    assert ctx.model_source("job:" + "0" * 32) == "job"
    assert ctx.model_source("plain-name") == "local"
    assert ctx.model_source("acme/local") == "local"
    assert ctx.model_source("google/ddpm-celebahq-256") == "hub"
    ctx.close()


# ------------------------------------------------------------------ safe loading
def test_pickled_weights_are_refused_and_the_same_model_in_safetensors_samples(
    run_inline, tiny_ddpm_dir, monkeypatch, tmp_path
):
    """Weights that are only a pickle (`.bin`) fail the job, naming the model and the
    file, from a local folder and from the hub cache; the same model in safetensors
    (tiny_ddpm_dir) samples."""
    from diffusers import DDPMPipeline

    pickled = tiny_ddpm_dir.parent / "tiny-pickled"
    DDPMPipeline.from_pretrained(tiny_ddpm_dir).save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file() and not list(pickled.rglob("*.safetensors"))
    job = run_inline("ddpm.sample", {"model": "tiny-pickled", "num_images": 1, "steps": 2})
    assert job.status == "failed" and not job.artifacts
    assert ("UnsafeWeights: model tiny-pickled: its weights are pickled (unet/diffusion_pytorch_model.bin), and only "
            "safetensors weights are loaded") in job.error

    # The same pipeline as a hub repo already in the HF cache (offline): refused the same way.
    offline_hub_cache_with("acme/pickled-ddpm", pickled, monkeypatch, tmp_path)
    job = run_inline("ddpm.sample", {"model": "acme/pickled-ddpm", "num_images": 1, "steps": 2})
    assert job.status == "failed"
    assert ("UnsafeWeights: model acme/pickled-ddpm: its weights are pickled (unet/diffusion_pytorch_model.bin), and "
            "only safetensors weights are loaded") in job.error

    job = succeeded(run_inline("ddpm.sample", {"model": "tiny-ddpm", "num_images": 1, "steps": 2}))
    assert pixels(job, "images/0000.png").shape == (16, 16, 3)


# ------------------------------------------------------------------ spec errors
@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ({"guidance": {"color": [0.1, 0.2]}}, "guidance.color", "must have 3 values [r, g, b] (or 1"),
        ({"guidance": {"color": [0.1, 0.2, 0.3, 0.4]}}, "guidance.color", "got 4"),
        ({"guidance": {"color": [0.1, 1.5, 0.3]}}, "guidance.color.1", "less than or equal to 1"),
        ({"guidance": {"color": TARGET, "scale": 0}}, "guidance.scale", "greater than 0"),
        ({"guidance": {"color": TARGET, "scale": 1e6}}, "guidance.scale", "less than or equal to 10000"),
        ({"guidance": {"colour": TARGET}}, "guidance.colour", "not permitted"),
        ({"num_images": 3, "class_label": [1, 2]}, "class_label", "has 2 entries, num_images is 3"),
        ({"class_label": 1000}, "class_label", "[0, 999]"),
        ({"class_label": 1.5}, "class_label", "integer"),
        ({"steps": 1000, "preview_every": 2}, "preview_every", "use at least 5"),
        ({"preview_every": 0}, "preview_every", "greater than or equal to 1"),
    ],
)
def test_spec_errors_name_the_field(params, field, fragment):
    with pytest.raises(SpecError) as info:
        validate_params("ddpm.sample", {"model": "m", **params})
    assert field in info.value.fields, info.value.fields
    assert fragment in info.value.fields[field]


def test_spec_accepts_hub_ids_names_and_single_labels():
    assert validate_params("ddpm.sample", {"model": "google/ddpm-celebahq-256"}).model == "google/ddpm-celebahq-256"
    spec = validate_params("ddpm.sample", {"model": "m", "num_images": 4, "class_label": ["dog"]})
    assert spec.class_label == ["dog"] and spec.preview_interval == 50 // 8
    assert validate_params("ddpm.sample", {"model": "m", "class_label": "cat"}).class_label == "cat"
    for bad in ["a/b/c", "a/../b", "/abs", "a/", "org/.hidden"]:
        with pytest.raises(SpecError):
            validate_params("ddpm.sample", {"model": bad})
