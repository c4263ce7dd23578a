"""End to end: real `diffqueue web` and `diffqueue worker` processes, jobs over HTTP.

Once on the embedded default (SQLite, SQLite broker, local folder) and once on
PostgreSQL + Redis + S3 (moto's server). Train a tiny DDPM, download model/,
load it with DDPMPipeline.from_pretrained, sample from it over the API.
"""
from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

TRAIN_PARAMS = {"preset": "tiny", "max_steps": 30, "sample_steps": 10, "num_samples": 4}


def fetch(svc, url: str) -> bytes:
    resp = svc.get(url)
    assert resp.status_code == 200, (url, resp.status_code)
    return resp.content


def download_prefix(svc, job: dict, prefix: str, dest: Path) -> None:
    """Download every artifact under `prefix` (artifact URLs are absolute)."""
    for a in job["artifacts"]:
        if a["name"].startswith(prefix):
            path = dest / a["name"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(fetch(svc, a["url"]))


def train_sample_roundtrip(svc, tmp_path: Path) -> None:
    # 1. Submit a tiny training job over HTTP and poll it to succeeded.
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": TRAIN_PARAMS})
    assert resp.status_code == 202, resp.text
    assert resp.headers["Location"].endswith(f"/api/v1/jobs/{resp.json()['id']}")
    train_id = resp.json()["id"]
    job = svc.wait_finished(train_id)
    assert job["status"] == "succeeded", job["error"] or job
    assert job["attempt"] == 1
    assert job["progress"]["step"] == job["progress"]["total"]
    names = {a["name"] for a in job["artifacts"]}
    assert {"loss.png", "loss.csv", "samples.png", "metrics.json", "model/model_index.json"} <= names
    assert any(n.startswith("model/unet/") and n.endswith(".safetensors") for n in names)
    assert job["result"]["steps"] == TRAIN_PARAMS["max_steps"]

    loss_csv = fetch(svc, next(a["url"] for a in job["artifacts"] if a["name"] == "loss.csv")).decode()
    assert len(loss_csv.strip().splitlines()) == TRAIN_PARAMS["max_steps"] + 1

    # 2. Download model/ and load it with the real diffusers loader; it samples.
    from diffusers import DDPMPipeline
    import torch

    model_dir = tmp_path / "model"
    download_prefix(svc, job, "model/", model_dir)
    pipe = DDPMPipeline.from_pretrained(model_dir)
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.num_class_embeds == 10
    with torch.no_grad():
        out = pipe.unet(torch.randn(2, 1, 16, 16), torch.tensor([10, 10]), class_labels=torch.tensor([1, 2])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()

    # 3. Sample from the job's model through the service.
    params = {"model": f"job:{train_id}", "num_images": 3, "steps": 5, "class_label": [1, 2, 3], "seed": 7}
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": params})
    assert resp.status_code == 202, resp.text
    job = svc.wait_finished(resp.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    images = sorted((a for a in job["artifacts"] if a["name"].startswith("images/")), key=lambda a: a["name"])
    assert [a["name"] for a in images] == [
        "images/0000.png", "images/0001.png", "images/0002.png"]
    for a in images:
        img = Image.open(io.BytesIO(fetch(svc, a["url"])))
        assert img.size == (16, 16) and img.mode == "L"
        assert a["meta"]["class_label"] in {"1", "2", "3"}
    preview = next(a for a in job["artifacts"] if a["name"] == "preview.png")
    assert preview["meta"] == {"step": "5", "of": "5"}  # the last preview is of the final step
    assert Image.open(io.BytesIO(fetch(svc, preview["url"]))).width > 2 * 16
    grid = next(a for a in job["artifacts"] if a["name"] == "grid.png")
    assert Image.open(io.BytesIO(fetch(svc, grid["url"]))).size[0] > 16

    # 4. A model reference to no job is refused at submit, naming the field; one to a
    # job that made no model (the sampling job) fails in the worker, with the reason recorded.
    missing = "0" * 32
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": {"model": f"job:{missing}"}})
    assert resp.status_code == 400 and f"job:{missing} not found" in resp.json()["fields"]["model"], resp.text
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": {"model": f"job:{job['id']}"}})
    job = svc.wait_finished(resp.json()["id"])
    assert job["status"] == "failed"
    assert "produced no model/ artifacts" in job["error"] and job["traceback"]


def test_embedded_default_train_then_sample(sqlite_settings, start_services, tmp_path):
    svc = start_services(sqlite_settings)
    train_sample_roundtrip(svc, tmp_path)


@pytest.mark.services
def test_postgres_redis_s3_train_then_sample(prod_settings, start_services, tmp_path):
    svc = start_services(prod_settings)
    health = svc.api("GET", "/healthz").json()
    assert health["ok"] and all(c["ok"] for c in health["checks"].values())
    train_sample_roundtrip(svc, tmp_path)


@pytest.mark.services
def test_duplicate_delivery_runs_once(prod_settings, start_services):
    """The same run_job message delivered twice: the second claim fails and the job runs once."""
    from shared.broker import RUN_JOB_TASK, make_producer

    svc = start_services(prod_settings)
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": {"preset": "tiny", "max_steps": 5,
                                                                            "sample_steps": 2, "num_samples": 1}})
    job_id = resp.json()["id"]
    make_producer(prod_settings).send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    job = svc.wait_finished(job_id)
    assert job["status"] == "succeeded", job["error"]
    # Give the duplicate time to be consumed, then check it changed nothing.
    deadline = time.monotonic() + 20
    while "not claimable" not in svc.log("worker") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not claimable" in svc.log("worker")
    again = svc.api("GET", f"/jobs/{job_id}").json()
    assert again["attempt"] == 1 and again["status"] == "succeeded"
    assert again["finished_at"] == job["finished_at"]


def test_cancel_running_training(sqlite_settings, start_services):
    """Cancel mid-training: the job ends cancelled within a step or two, partial artifacts listed."""
    svc = start_services(sqlite_settings)
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": {"max_steps": 100000}})
    job_id = resp.json()["id"]
    running = svc.wait_for(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 3,
                           what="training steps")
    resp = svc.api("POST", f"/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    step_at_cancel = resp.json()["progress"]["step"]
    job = svc.wait_finished(job_id, timeout_s=30)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] - step_at_cancel <= 2, (step_at_cancel, job["progress"])
    assert running["progress"]["total"] == 100000
    names = {a["name"] for a in job["artifacts"]}
    assert {"loss.csv", "loss.png"} <= names and not any(n.startswith("model/") for n in names)
    # A finished job cannot be cancelled again; it can be retried.
    assert svc.api("POST", f"/jobs/{job_id}/cancel").status_code == 409


def test_sigterm_requeues_running_job(sqlite_settings, start_services):
    """SIGTERM the worker mid-training: the job goes back to the queue (not lost, not
    stuck running) and the next worker runs it to success as attempt 2."""
    svc = start_services(sqlite_settings)
    resp = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": {"preset": "tiny", "max_steps": 60,
                                                                            "sample_steps": 2, "num_samples": 1,
                                                                            "checkpoint_every": 1000}})
    job_id = resp.json()["id"]
    svc.wait_for(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 3, what="training steps")
    worker = svc.procs.pop("worker")
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    job = svc.api("GET", f"/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 1, job
    assert "worker shut down" in job["progress"]["message"]

    svc.start_worker("worker2")
    job = svc.wait_finished(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    # Training checkpointed the steps it had done before it let go, and resumed there.
    assert job["result"]["resumed_from_step"] >= 3


@pytest.mark.services
def test_sigkilled_worker_resumes_training_from_its_checkpoint(prod_settings, start_services):
    """Inject: SIGKILL the worker (no shutdown code runs) while it sits right after
    publishing checkpoint 4 of 6. Check: the broker delivers the job again (Redis
    visibility timeout), the new worker claims it once the dead one's lease expires,
    resumes from step 4 (not 0), and the job ends succeeded on attempt 2 with one set
    of final artifacts and the loss trajectory of an uninterrupted run."""
    from dataclasses import replace

    settings = replace(prod_settings, lease_s=2.0, heartbeat_s=0.5, visibility_timeout_s=3,
                       failpoints="checkpoint.published@4=pause")
    svc = start_services(settings)
    params = {"preset": "tiny", "max_steps": 6, "checkpoint_every": 2, "sample_steps": 2, "num_samples": 2}
    job_id = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": params}).json()["id"]
    svc.wait_for(job_id, lambda j: any(a["name"] == "checkpoints/step-000004.safetensors" for a in j["artifacts"]),
                 what="checkpoint 4")
    deadline = time.monotonic() + 30
    while "failpoint checkpoint.published@4: pause" not in svc.log("worker") and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = svc.procs.pop("worker")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert svc.api("GET", f"/jobs/{job_id}").json()["status"] == "running"  # its lease runs out on its own

    svc.env["DIFFQUEUE_FAILPOINTS"] = ""
    svc.start_worker("worker2")
    job = svc.wait_finished(job_id, timeout_s=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    assert job["result"]["resumed_from_step"] == 4
    assert "resumed from step 4" in svc.log("worker2")
    names = [a["name"] for a in job["artifacts"]]
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("checkpoints/")] == ["checkpoints/step-000004.safetensors",
                                                                  "checkpoints/step-000006.safetensors"]
    assert sum(n.startswith("model/unet/") for n in names) == 2

    # The same job uninterrupted, in this process, with the workers' single thread.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from tests.conftest import InlineRunner

        reference = InlineRunner(replace(settings, failpoints=""))("ddpm.train", params)
    finally:
        torch.set_num_threads(threads)
    resumed = fetch(svc, next(a["url"] for a in job["artifacts"] if a["name"] == "loss.csv")).decode()
    expected = reference.read("loss.csv").decode()
    got = [float(line.split(",")[1]) for line in resumed.split()[1:]]
    want = [float(line.split(",")[1]) for line in expected.split()[1:]]
    assert len(got) == 6
    assert got == pytest.approx(want, rel=1e-4)


def test_sd_jobs_through_the_worker(sqlite_settings, start_services, tiny_sd_dir):
    """Each Stable Diffusion kind through real web and worker processes on the tiny
    pipeline; the worker's second job finds the pipeline warm; cancel stops the loop."""
    svc = start_services(sqlite_settings)
    base = {"model": "tiny-sd", "steps": 3, "width": 32, "height": 32}

    def run(kind: str, params: dict) -> dict:
        resp = svc.api("POST", "/jobs", json={"kind": kind, "params": params})
        assert resp.status_code == 202, resp.text
        job = svc.wait_finished(resp.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        return job

    txt = run("sd.txt2img", {**base, "prompts": ["a rose", "a fox"], "num_images_per_prompt": 2})
    assert txt["result"]["model_cache"] == "miss"
    assert {"images/0000-00.png", "images/0001-01.png", "grid.png", "manifest.json"} <= {
        a["name"] for a in txt["artifacts"]}
    assert txt["progress"]["preview"]["name"].startswith("previews/")
    sweep = run("sd.sweep", {**base, "prompt": "a rose", "guidance_scales": [0.5, 1.0, 7.5]})
    assert sweep["result"]["model_cache"] == "hit" and sweep["result"]["cells"] == 3
    img = run("sd.img2img", {**base, "init_image": f"job:{txt['id']}/images/0000-00.png", "prompts": ["a tulip"],
                             "strength": 0.6})
    image = Image.open(io.BytesIO(fetch(svc, next(a["url"] for a in img["artifacts"] if a["name"] == "images/0000-00.png"))))
    assert image.size == (32, 32) and img["result"]["model_cache"] == "hit"

    # Cancel mid-loop: the job stops between denoising steps.
    resp = svc.api("POST", "/jobs", json={"kind": "sd.txt2img", "params": {**base, "steps": 500, "prompts": ["a rose"]}})
    job_id = resp.json()["id"]
    svc.wait_for(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 3, what="denoising steps")
    step_at_cancel = svc.api("POST", f"/jobs/{job_id}/cancel").json()["progress"]["step"]
    job = svc.wait_finished(job_id, timeout_s=60)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < 500 and job["progress"]["step"] - step_at_cancel <= 50


def test_queued_compatible_jobs_run_as_one_batch(prod_settings, tmp_path, tiny_sd_dir):
    """Cross-job batching through Celery on Redis + Postgres: three compatible txt2img
    jobs queued before the worker starts are claimed by it together and denoised as one
    batch; their own broker messages, delivered next, are dropped as duplicates; an
    incompatible job (other steps) runs alone; each job has its own images."""
    from tests.conftest import Services

    svc = Services(prod_settings, tmp_path)
    try:
        svc.start_web()
        base = {"model": "tiny-sd", "steps": 3, "width": 32, "height": 32}
        prompts = [["a rose"], ["a fox", "a boat"], ["a lighthouse"]]
        ids = [svc.api("POST", "/jobs", json={"kind": "sd.txt2img",
                                              "params": {**base, "prompts": p, "seed": i}}).json()["id"]
               for i, p in enumerate(prompts)]
        odd = svc.api("POST", "/jobs", json={"kind": "sd.txt2img",
                                             "params": {**base, "steps": 4, "prompts": ["a tulip"]}}).json()["id"]
        svc.start_worker()
        jobs = [svc.wait_finished(i) for i in ids]
        for job, own_prompts in zip(jobs, prompts):
            assert job["status"] == "succeeded" and job["attempt"] == 1, job["error"]
            assert sorted(job["result"]["batched_with"]) == sorted(set(ids) - {job["id"]})
            assert job["result"]["batch_rows"] == 4
            images = [a for a in job["artifacts"] if a["name"].startswith("images/")]
            assert len(images) == len(own_prompts)
            for a in images:
                assert Image.open(io.BytesIO(fetch(svc, a["url"]))).size == (32, 32)
        alone = svc.wait_finished(odd)
        assert alone["status"] == "succeeded" and "batched_with" not in alone["result"]
        # The job whose message came first claimed the others: their messages are dropped.
        svc.wait_until("the partners' own messages to be dropped",
                       lambda: sum(f"job {i} not claimable" in svc.log("worker") for i in ids) == len(ids) - 1, 30)
    finally:
        svc.stop()
