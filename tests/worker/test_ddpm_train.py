"""ddpm.train through the real Executor, in process, on the tiny preset: checkpoints,
resume with the same loss trajectory, EMA, accumulation, precisions, datasets, presets,
the final progress and the exported model's card."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared import jobs
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.specs import validate_params

# Every feature whose state a checkpoint must carry: EMA, accumulation, warmup and
# a decaying lr, flips (RNG), AdamW moments.
RESUMABLE = {
    "preset": "tiny", "max_steps": 6, "batch_size": 8, "gradient_accumulation_steps": 2, "checkpoint_every": 2,
    "checkpoints_keep": 2, "use_ema": True, "random_flip": True, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
    "sample_every": 0, "sample_steps": 2, "num_samples": 10,
}


def losses_of(job) -> list[float]:
    rows = list(csv.DictReader(io.StringIO(job.read("loss.csv").decode())))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    return [float(r["loss"]) for r in rows]


def names(job, prefix: str = "") -> list[str]:
    return sorted(a.name for a in job.artifacts if a.name.startswith(prefix))


def checkpoint_names(*steps: int) -> list[str]:
    return [f"checkpoints/step-{step:06d}.safetensors" for step in steps]


def retry(settings, job_id: str) -> None:
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        jobs.retry(session, settings, job_id)


def test_retry_resumes_from_the_last_checkpoint_with_the_same_losses(run_inline, sqlite_settings):
    uninterrupted = run_inline("ddpm.train", RESUMABLE)
    assert uninterrupted.status == "succeeded", uninterrupted.traceback
    assert names(uninterrupted, "checkpoints/") == checkpoint_names(4, 6)

    # The first attempt dies right after checkpoint 4 is published.
    faulty = replace(sqlite_settings, failpoints="checkpoint.published@4=raise")
    job = run_inline("ddpm.train", RESUMABLE, settings=faulty)
    assert job.status == "failed" and "failpoint checkpoint.published@4" in job.error
    assert names(job, "checkpoints/") == checkpoint_names(2, 4)

    retry(sqlite_settings, job.id)
    job = run_inline.again(job.id)
    assert job.status == "succeeded", job.traceback
    assert job.attempt == 2
    assert job.result["resumed_from_step"] == 4
    assert names(job, "checkpoints/") == checkpoint_names(4, 6)
    assert len(names(job, "model/unet/")) == 2  # config + weights: one set
    # Steps 1-4 come from the checkpoint, 5-6 were trained after the resume; all
    # match the uninterrupted run (same seed, same data order, same noise).
    np.testing.assert_allclose(losses_of(job), losses_of(uninterrupted), rtol=1e-5)
    assert job.read("model/unet/diffusion_pytorch_model.safetensors") == uninterrupted.read(
        "model/unet/diffusion_pytorch_model.safetensors")


def test_a_checkpoint_killed_while_writing_is_never_used(run_inline, sqlite_settings):
    """The fault hits after step 4's file is written locally but before it is
    published: the listed checkpoints stay complete and the retry resumes from 2."""
    params = {**RESUMABLE, "use_ema": False, "gradient_accumulation_steps": 1}
    job = run_inline("ddpm.train", params, settings=replace(sqlite_settings, failpoints="checkpoint.writing@4=raise"))
    assert job.status == "failed"
    assert names(job, "checkpoints/") == checkpoint_names(2)
    retry(sqlite_settings, job.id)
    job = run_inline.again(job.id)
    assert job.status == "succeeded", job.traceback
    assert job.result["resumed_from_step"] == 2
    assert len(losses_of(job)) == 6


def test_keep_limit_deletes_old_checkpoints_from_storage(run_inline, sqlite_settings):
    from shared.storage import make_storage

    job = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 5, "checkpoint_every": 1, "checkpoints_keep": 2,
                                    "sample_steps": 2, "num_samples": 2})
    assert job.status == "succeeded", job.traceback
    assert names(job, "checkpoints/") == checkpoint_names(4, 5)
    stored = make_storage(sqlite_settings).list(f"jobs/{job.id}/checkpoints/")
    assert [f"checkpoints/{k.rsplit('/', 1)[1]}" for k in stored] == checkpoint_names(4, 5)


def test_a_checkpoint_is_a_safetensors_file_with_the_rest_in_its_metadata(run_inline, tmp_path):
    from safetensors import safe_open

    from worker import checkpoints

    job = run_inline("ddpm.train", {**RESUMABLE, "max_steps": 2})
    assert job.status == "succeeded", job.traceback
    path = tmp_path / "step-000002.safetensors"
    path.write_bytes(job.read("checkpoints/step-000002.safetensors"))
    with safe_open(path, framework="pt", device="cpu") as f:
        keys, metadata = set(f.keys()), f.metadata()
        rng = f.get_tensor("rng")
    # Tensors keyed by their path in the state; everything else is JSON in the header.
    assert {"model/conv_in.weight", "optimizer/state/0/exp_avg", "optimizer/state/0/step", "ema/shadow_params/0",
            "rng"} <= keys
    assert rng.dtype == torch.uint8
    assert set(metadata) == {"format_version", "state"}
    skeleton = json.loads(metadata["state"])
    assert skeleton["step"] == 2 and len(skeleton["losses"]) == 2 and skeleton["spec"]["max_steps"] == 2
    assert skeleton["model"]["conv_in.weight"] == {"$tensor": "model/conv_in.weight"}

    # Read back, the state has the types the loaders check: int parameter numbers,
    # tuples, floats that stay floats.
    state = checkpoints.read(path)
    assert sorted(state["optimizer"]["state"])[:2] == [0, 1]
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert isinstance(state["ema"]["decay"], float) and isinstance(state["ema"]["optimization_step"], int)
    assert torch.equal(state["rng"], rng)


def test_flatten_round_trips_and_refuses_what_json_cannot_hold():
    from worker import checkpoints

    state = {"a": {0: torch.arange(3), "x/y": (1.0, None, "s")}, "$odd": [True, {"k": torch.ones(2, 2)}],
             "nan": float("nan")}
    tensors, skeleton = checkpoints.flatten(state)
    assert sorted(tensors) == ["$odd/1/k", "a/0"]
    back = checkpoints.unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back["a"]["x/y"] == (1.0, None, "s") and torch.equal(back["a"][0], torch.arange(3))
    assert back["$odd"][0] is True and torch.equal(back["$odd"][1]["k"], torch.ones(2, 2))
    assert back["nan"] != back["nan"]  # NaN survives (a diverged loss is still a loss)
    with pytest.raises(TypeError, match="checkpoint: opt/fn is a function; only tensors and JSON values"):
        checkpoints.flatten({"opt": {"fn": lambda: 0}})
    with pytest.raises(ValueError, match="tensors that the skeleton does not mention"):
        checkpoints.unflatten({"a": 1}, {"stray": torch.zeros(1)})


def test_pickles_planted_as_checkpoints_are_never_loaded(run_inline, sqlite_settings, tmp_path, monkeypatch, caplog):
    """Only `step-N.safetensors` files are candidates, and they are read by
    safetensors alone: a `.pt` with a newer step, valid for torch.load, is ignored,
    and a pickle named like a checkpoint is unreadable, so the resume falls back."""
    import pickle

    from shared.models import Artifact
    from shared.storage import job_key, make_storage
    from worker import checkpoints

    marker = tmp_path / "unpickled"

    class Payload:  # runs code when unpickled, as a hostile pickle would
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    evil = pickle.dumps(Payload())
    pickle.loads(evil)  # the payload is live: unpickling it does write the marker
    assert marker.read_text() == "code ran"
    marker.unlink()

    params = {**RESUMABLE, "use_ema": False, "gradient_accumulation_steps": 1}
    job = run_inline("ddpm.train", params, settings=replace(sqlite_settings, failpoints="checkpoint.writing@4=raise"))
    assert job.status == "failed" and names(job, "checkpoints/") == checkpoint_names(2)
    real = tmp_path / "real.safetensors"
    real.write_bytes(job.read("checkpoints/step-000002.safetensors"))
    state = checkpoints.read(real)
    pt = tmp_path / "step-000005.pt"
    torch.save({**state, "step": 5, "losses": state["losses"] + [0.1] * 3}, pt)
    assert torch.load(pt, weights_only=True)["step"] == 5  # what the old loader would have resumed from
    planted = {"checkpoints/step-000005.pt": pt.read_bytes(), "checkpoints/step-000003.safetensors": evil}
    storage = make_storage(sqlite_settings)
    with session_scope(make_sessionmaker(make_engine(sqlite_settings.database_url))) as session:
        for name, data in planted.items():
            storage.put_bytes(job_key(job.id, name), data, "application/octet-stream")
            session.add(Artifact(job_id=job.id, name=name, kind="checkpoint", content_type="application/octet-stream",
                                 size=len(data), sha256="0" * 64, meta={}))

    torch_loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: torch_loads.append(a) or real_load(*a, **kw))
    retry(sqlite_settings, job.id)
    job = run_inline.again(job.id)
    assert job.status == "succeeded", job.traceback
    assert job.result["resumed_from_step"] == 2
    assert not marker.exists() and torch_loads == []
    assert "checkpoint checkpoints/step-000003.safetensors is unreadable" in caplog.text
    assert "checkpoints/step-000005.pt is not a step-N.safetensors checkpoint; it is never loaded" in caplog.text
    # The planted pickle was pruned with the real ones; the .pt is not a checkpoint, so it stays untouched.
    assert names(job, "checkpoints/") == [*checkpoint_names(4), "checkpoints/step-000005.pt",
                                          *checkpoint_names(6)]


def test_samples_every_n_steps_and_metrics(run_inline):
    job = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 4, "sample_every": 2, "sample_steps": 2,
                                    "num_samples": 20})
    assert job.status == "succeeded", job.traceback
    assert names(job, "samples/") == ["samples/step-000002.png", "samples/step-000004.png"]
    grid = Image.open(io.BytesIO(job.read("samples/step-000004.png")))
    assert grid.mode == "L" and grid.size == (10 * 16 + 11 * 2, 2 * 16 + 3 * 2)  # a column per class
    metrics = json.loads(job.read("metrics.json"))
    assert metrics["steps"] == 4 and metrics["images_per_s"] > 0 and metrics["dataset_size"] == 1797
    assert metrics["classes"] == [str(i) for i in range(10)]
    assert json.loads(job.read("model/class_names.json")) == metrics["classes"]
    assert 0 < metrics["final_loss"] < 2


def test_a_finished_job_shows_its_training_steps_not_the_final_grids_sampling(run_inline, client):
    # 3 sampling steps for the final grid, 4 training steps: the two counts differ.
    job = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 4, "sample_steps": 3, "num_samples": 2})
    assert job.status == "succeeded", job.traceback
    assert (job.progress_step, job.progress_total) == (4, 4)
    assert job.progress_message == f"trained 4/4 steps, final loss {job.result['final_loss']:.4f}"
    [listed] = client.get("/api/v1/jobs").get_json()["jobs"]
    assert listed["progress"]["step"] == listed["progress"]["total"] == 4
    assert listed["progress"]["message"].startswith("trained 4/4 steps")
    page = client.get(f"/jobs/{job.id}").get_data(as_text=True)
    assert '<p id="message" aria-live="polite">trained 4/4 steps, final loss' in page


def model_folder(client, job_id: str, dest: Path) -> Path:
    """The job's model as a user gets it: the `?prefix=model/` archive, unzipped."""
    resp = client.get(f"/api/v1/jobs/{job_id}/archive?prefix=model/")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    zipfile.ZipFile(io.BytesIO(resp.data)).extractall(dest)
    return dest / "model"


def card_block(card: str, heading: str, lang: str) -> str:
    """The first ```lang block after `heading` in the card."""
    match = re.search(rf"^#+ {re.escape(heading)}\n.*?```{lang}\n(.*?)\n```", card, re.S | re.M)
    assert match, f"no {lang} block under {heading!r} in:\n{card}"
    return match.group(1)


@pytest.mark.parametrize("class_conditional", [True, False])
def test_the_model_card_says_how_to_sample_and_its_snippet_does(run_inline, client, tmp_path, class_conditional):
    from diffusers import DDPMPipeline
    from huggingface_hub import ModelCard

    job = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 3, "class_conditional": class_conditional,
                                    "sample_steps": 2, "num_samples": 2})
    assert job.status == "succeeded", job.traceback
    assert "model/README.md" in names(job, "model/")
    folder = model_folder(client, job.id, tmp_path)
    card = (folder / "README.md").read_text()
    metrics = json.loads(job.read("metrics.json"))

    # The metadata the hub reads, then what the card says of the run.
    data = ModelCard.load(folder / "README.md").data
    assert data.library_name == "diffusers" and {"ddpm", "diffqueue"} <= set(data.tags)
    assert ("class-conditional" in data.tags) == class_conditional
    assert json.loads(card_block(card, "Training params", "json")) == job.params
    assert json.loads(card_block(card, "Metrics", "json")) == metrics
    assert "| Dataset | `digits`: scikit-learn's handwritten digits" in card and "1797 images" in card
    assert "| Steps trained | 3 |" in card
    assert f"| Final loss | {metrics['final_loss']:.6f} " in card
    classes = ", ".join(f"`{i}`" for i in range(10)) if class_conditional else "none: unconditional"
    assert f"| Classes | {classes} |" in card

    # The snippet, run as the card gives it, beside the unzipped folder, with stock diffusers.
    snippet = card_block(card, "How to sample it", "python")
    assert "diffqueue" not in snippet and "worker" not in snippet
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    written = sorted(tmp_path.glob("sample-*.png"))
    assert len(written) == (10 if class_conditional else 4), proc.stdout
    for path in written:
        image = Image.open(path)
        assert (image.size, image.mode) == ((16, 16), "L")
        assert np.asarray(image).std() > 0  # decoded pixels, not a blank
    if class_conditional:
        assert proc.stdout.splitlines() == [f"sample-{i:03d}.png {i}" for i in range(10)]
        # What the card warns of: the stock pipeline cannot sample this model.
        with pytest.raises(ValueError, match="class_labels should be provided"):
            DDPMPipeline.from_pretrained(folder)(num_inference_steps=1)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_are_trained_and_exported(run_inline, prediction_type):
    job = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 3, "prediction_type": prediction_type,
                                    "class_conditional": False, "sample_steps": 2, "num_samples": 2})
    assert job.status == "succeeded", job.traceback
    config = json.loads(job.read("model/scheduler/scheduler_config.json"))
    assert config["prediction_type"] == prediction_type
    assert json.loads(job.read("model/unet/config.json"))["num_class_embeds"] is None
    assert "model/class_names.json" not in names(job)


def test_mixed_precision_on_cpu(run_inline):
    bf16 = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 3, "mixed_precision": "bf16", "sample_steps": 2,
                                     "num_samples": 2})
    assert bf16.status == "succeeded", bf16.traceback
    assert bf16.result["mixed_precision"] == "bf16" and np.isfinite(bf16.result["final_loss"])
    fp16 = run_inline("ddpm.train", {"preset": "tiny", "max_steps": 2, "mixed_precision": "fp16", "sample_steps": 2,
                                     "num_samples": 2})
    assert fp16.status == "succeeded", fp16.traceback
    assert fp16.result["mixed_precision"] == "no"  # fp16 autocast needs a GPU


def test_epochs_set_the_step_count(run_inline):
    job = run_inline("ddpm.train", {"preset": "tiny", "epochs": 1, "batch_size": 512, "sample_steps": 2,
                                    "num_samples": 2})
    assert job.status == "succeeded", job.traceback
    assert job.result["steps"] == 1797 // 512


def test_batch_larger_than_the_dataset_fails_clearly(run_inline):
    job = run_inline("ddpm.train", {"preset": "tiny", "max_train_samples": 10, "batch_size": 32})
    assert job.status == "failed"
    assert "batch_size 32 is larger than the dataset (10 images)" in job.error


def test_hf_dataset_offline_fails_fast_and_clearly(run_inline, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    job = run_inline("ddpm.train", {"preset": "fashion-32", "dataset": "hf:nobody/no-such-dataset", "max_steps": 1})
    assert job.status == "failed"
    assert "dataset hf:nobody/no-such-dataset (split train) could not be loaded" in job.error
    assert "unreachable" in job.error


def test_hf_dataset_columns_labels_and_padding(run_inline, tmp_path, monkeypatch):
    """A datasets-format dataset (here a local one, as the hub is out of reach) with
    an Image and a ClassLabel column: 28 px grayscale padded to 32 (Pad(2)), as fashion-32 trains."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L") for _ in range(12)]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["shirt", "shoe"])})
    ds = datasets.Dataset.from_dict({"img": pics, "kind": [i % 2 for i in range(12)]}, features=features)
    (tmp_path / "local").mkdir()
    ds.to_parquet(str(tmp_path / "local" / "clothes" / "train.parquet"))

    # The tiny preset names no columns: the Image and ClassLabel features are found.
    job = run_inline("ddpm.train", {
        "preset": "tiny", "dataset": "hf:local/clothes", "image_size": 32, "resize_mode": "pad", "max_steps": 2,
        "batch_size": 4, "sample_steps": 2, "num_samples": 4,
    })
    assert job.status == "succeeded", job.traceback
    assert job.result["classes"] == ["shirt", "shoe"] and job.result["dataset_size"] == 12
    unet_config = json.loads(job.read("model/unet/config.json"))
    assert (unet_config["in_channels"], unet_config["sample_size"], unet_config["num_class_embeds"]) == (1, 32, 2)


def test_padding_keeps_the_image_and_adds_a_black_border():
    from worker.data.datasets import preprocess

    img = Image.new("L", (28, 28), 200)
    arr = preprocess(img, 32, "pad", 1)
    assert arr.shape == (1, 32, 32)
    assert (arr[0, 2:30, 2:30] == 200).all() and arr[0, :2].max() == 0 and arr[0, :, :2].max() == 0
    rgb = preprocess(Image.new("RGB", (50, 20), (10, 20, 30)), 16, "resize", 3)
    assert rgb.shape == (3, 16, 16) and tuple(rgb[:, 8, 8]) == (10, 20, 30)


def test_presets_match_the_source_models():
    """The book's UNet has 63.2 M params; the guide's has attention only at level 4."""
    from worker.runners.ddpm_train import build_unet

    book = validate_params("ddpm.train", {"preset": "book-64"})
    unet = build_unet(book, 3, None)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 63.2
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert (book.beta_start, book.batch_size, book.learning_rate, book.epochs) == (0.001, 16, 1e-4, 50)
    guide = validate_params("ddpm.train", {"preset": "guide-128"})
    assert guide.attention_levels == [4] and guide.block_out_channels == [128, 128, 256, 256, 512, 512]
    fashion = validate_params("ddpm.train", {"preset": "fashion-32"})
    assert (fashion.learning_rate, fashion.adam_epsilon, fashion.batch_size, fashion.channels) == (3e-4, 1e-5, 256, 1)
    assert fashion.resize_mode == "pad" and fashion.class_conditional


def test_uploaded_zip_with_class_folders_trains_a_class_conditioned_model(run_inline, sqlite_settings, tmp_path):
    """Upload a zip (through the real upload code), train on it: the folders become
    labels, RGB images give a 3-channel model, and the export records the class names."""
    from shared.storage import make_storage
    from shared.uploads import save_upload
    from tests.upload_files import png_bytes, zip_bytes

    entries = {f"pets/{cls}/{i}.png": png_bytes(12, 10, color=(40 * i, 200 if cls == "cat" else 0, 90))
               for cls in ("dog", "cat") for i in range(4)}
    path = tmp_path / "pets.zip"
    path.write_bytes(zip_bytes(entries))
    upload = save_upload(make_sessionmaker(make_engine(sqlite_settings.database_url)), make_storage(sqlite_settings),
                         sqlite_settings, "pets.zip", path)

    job = run_inline("ddpm.train", {"preset": "tiny", "dataset": f"upload:{upload.id}", "max_steps": 2,
                                    "batch_size": 4, "random_flip": True, "sample_steps": 2, "num_samples": 4})
    assert job.status == "succeeded", job.traceback
    assert job.result["classes"] == ["cat", "dog"] and job.result["dataset_size"] == 8
    assert json.loads(job.read("model/class_names.json")) == ["cat", "dog"]
    unet_config = json.loads(job.read("model/unet/config.json"))
    assert (unet_config["in_channels"], unet_config["num_class_embeds"]) == (3, 2)
    assert Image.open(io.BytesIO(job.read("samples.png"))).mode == "RGB"


def test_class_conditional_on_an_unlabelled_upload_fails_clearly(run_inline, sqlite_settings, tmp_path):
    from shared.storage import make_storage
    from shared.uploads import save_upload
    from tests.upload_files import flat_zip

    path = tmp_path / "flat.zip"
    path.write_bytes(flat_zip(4))
    upload = save_upload(make_sessionmaker(make_engine(sqlite_settings.database_url)), make_storage(sqlite_settings),
                         sqlite_settings, "flat.zip", path)
    job = run_inline("ddpm.train", {"preset": "tiny", "dataset": f"upload:{upload.id}", "batch_size": 2,
                                    "class_conditional": True, "max_steps": 1})
    assert job.status == "failed"
    assert "class_conditional is set but dataset" in job.error and "sub-folder" in job.error
