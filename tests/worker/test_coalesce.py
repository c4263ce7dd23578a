"""Cross-job batching (worker/coalesce.py) through the real Executor, in process, on
the tiny SD pipeline and a tiny DDPM: queued compatible jobs are claimed by one
execution and rendered as one batch, each with the images it would have alone,
its own artifacts, cancel and outcome; incompatible jobs, the row cap and
coalesce off leave jobs alone; a coalesced partner's own message is dropped."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Job
from shared.specs import KINDS, validate_params

BASE = {"model": "tiny-sd", "steps": 2, "width": 32, "height": 32}


def pixels(job, name: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(job.read(name))), dtype=np.int16)


def queue(run_inline, kind: str, params: dict) -> str:
    """A queued job that no worker has seen yet."""
    spec = validate_params(kind, params)
    with session_scope(run_inline._sessions(None)) as session:
        job = Job(kind=kind, params=spec.model_dump(mode="json"), queue=KINDS[kind].queue)
        session.add(job)
    return job.id


def run_queued(run_inline, *params: tuple[str, dict], settings=None) -> list:
    """Queue every job, deliver only the first one's message, return all the jobs."""
    ids = [queue(run_inline, kind, p) for kind, p in params]
    first = run_inline.again(ids[0], settings)
    return [first] + [load(run_inline, job_id) for job_id in ids[1:]]


def load(run_inline, job_id: str):
    """A job as it is now, without running it."""
    from shared.storage import job_key, make_storage

    with run_inline._sessions(None)() as session:
        job = session.get(Job, job_id)
        job.artifacts
        session.expunge(job)
    job.read = lambda name: make_storage(run_inline.settings).get_bytes(job_key(job.id, name))
    return job


@pytest.fixture
def alone(run_inline, sqlite_settings):
    """Run a job by itself, with coalescing off."""
    off = dataclasses.replace(sqlite_settings, coalesce=False)
    return lambda kind, params: run_inline(kind, params, off)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal within one 8-bit level: batched matmuls differ in float rounding."""
    return a.shape == b.shape and np.abs(a - b).max() <= 1


def test_three_txt2img_jobs_are_one_batch_with_their_own_images(run_inline, alone, tiny_sd_dir):
    params = [
        {**BASE, "prompts": ["a watercolor rose"], "seed": 3, "guidance_scale": 4.0},
        {**BASE, "prompts": ["a red fox", "a boat"], "seed": 11, "guidance_scale": 7.5, "negative_prompt": "fog"},
        {**BASE, "prompts": ["a lighthouse"], "num_images_per_prompt": 2, "seed": 40, "guidance_scale": 2.0},
    ]
    jobs = run_queued(run_inline, *[("sd.txt2img", p) for p in params])
    for job in jobs:
        assert job.status == "succeeded", job.traceback
        assert job.attempt == 1 and job.worker == jobs[0].worker
        assert sorted(job.result["batched_with"]) == sorted(j.id for j in jobs if j.id != job.id)
        assert job.result["batch_rows"] == 5
        assert job.progress_step == job.progress_total  # every step counted (PNDM: 2 steps, 3 passes)
    # Each job has its own artifacts, the same as alone, and its own manifest.
    names = [sorted(a.name for a in job.artifacts if a.name.startswith("images/")) for job in jobs]
    assert names == [["images/0000-00.png"], ["images/0000-00.png", "images/0001-00.png"],
                     ["images/0000-00.png", "images/0000-01.png"]]
    for job, p, images in zip(jobs, params, names):
        manifest = json.loads(job.read("manifest.json"))
        assert manifest["images"][0]["prompt"] == p["prompts"][0]
        reference = alone("sd.txt2img", p)
        assert "batched_with" not in reference.result
        for name in images:
            assert close(pixels(job, name), pixels(reference, name)), (job.id, name)

    # The partners' own messages, delivered later, are duplicates: dropped, nothing re-run.
    again = run_inline.again(jobs[1].id)
    assert (again.status, again.attempt, again.finished_at) == ("succeeded", 1, jobs[1].finished_at)


def test_a_sweep_cell_batched_with_txt2img_is_the_sweep_alone(run_inline, alone, tiny_sd_dir):
    sweep = {**BASE, "prompt": "a rose", "guidance_scales": [1.0, 4.0], "seeds": [5], "scheduler": "dpm++"}
    txt = {**BASE, "prompts": ["a fox"], "seed": 9, "scheduler": "dpm++"}
    cell, other = run_queued(run_inline, ("sd.sweep", sweep), ("sd.txt2img", txt))
    assert cell.status == other.status == "succeeded", cell.traceback or other.traceback
    assert cell.result["batched_with"] == [other.id] and cell.result["batch_rows"] == 3
    reference = alone("sd.sweep", sweep)
    for name in ("images/g1_s5.png", "images/g4_s5.png"):
        assert close(pixels(cell, name), pixels(reference, name))
    assert close(pixels(other, "images/0000-00.png"), pixels(alone("sd.txt2img", txt), "images/0000-00.png"))


def test_a_sweep_larger_than_its_batch_size_joins_a_batch(run_inline, alone, tiny_sd_dir):
    """Alone, the 3 cells run as UNet batches of 2 and 1; in a batch, the worker's
    row cap stands in for the job's batch_size, and the images are the same."""
    sweep = {**BASE, "prompt": "a rose", "guidance_scales": [1.0, 4.0, 7.5], "seeds": [5], "batch_size": 2}
    txt = {**BASE, "prompts": ["a fox"], "seed": 9}
    cell, other = run_queued(run_inline, ("sd.sweep", sweep), ("sd.txt2img", txt))
    assert cell.status == other.status == "succeeded", cell.traceback or other.traceback
    assert cell.result["batched_with"] == [other.id] and cell.result["batch_rows"] == 4
    reference = alone("sd.sweep", sweep)
    for name in ("images/g1_s5.png", "images/g4_s5.png", "images/g7.5_s5.png"):
        assert close(pixels(cell, name), pixels(reference, name)), name


def test_ddpm_sample_jobs_coalesced_equal_alone_and_a_bad_one_fails_alone(run_inline, alone, tiny_ddpm_dir):
    base = {"model": "tiny-ddpm", "steps": 4, "scheduler": "ddpm"}  # ddpm: fresh noise every step, per image seed
    params = [{**base, "num_images": 2, "seed": 0}, {**base, "num_images": 3, "seed": 100, "batch_size": 2},
              {**base, "num_images": 1, "class_label": 3}]  # the model is not class-conditioned
    jobs = run_queued(run_inline, *[("ddpm.sample", p) for p in params])
    assert [j.status for j in jobs] == ["succeeded", "succeeded", "failed"]
    assert "not class-conditioned" in jobs[2].error
    assert jobs[0].result["batched_with"] == [jobs[1].id, jobs[2].id]
    for job, p in zip(jobs[:2], params):
        reference = alone("ddpm.sample", p)
        for i in range(p["num_images"]):
            assert close(pixels(job, f"images/{i:04d}.png"), pixels(reference, f"images/{i:04d}.png"))
        assert job.result["num_images"] == p["num_images"]


def test_incompatible_jobs_are_not_coalesced(run_inline, tiny_sd_dir):
    one = {**BASE, "prompts": ["a rose"]}
    prompts_file = {**BASE, "prompts_upload": "upload:" + "0" * 32}  # its rows are unknown until it is read
    first, *others = run_queued(
        run_inline, ("sd.txt2img", one), ("sd.txt2img", {**one, "steps": 3}), ("sd.txt2img", {**one, "width": 48}),
        ("sd.txt2img", prompts_file), ("ddpm.sample", {"model": "tiny-ddpm"}))
    assert first.status == "succeeded" and "batched_with" not in first.result
    assert [job.status for job in others] == ["queued"] * 4


def test_a_queued_job_whose_params_do_not_validate_is_left_alone(run_inline, tiny_sd_dir):
    one = {**BASE, "prompts": ["a rose"]}
    first_id, bad_id = queue(run_inline, "sd.txt2img", one), queue(run_inline, "sd.txt2img", one)
    with session_scope(run_inline._sessions(None)) as session:  # a row from before a spec change, say
        session.execute(update(Job).where(Job.id == bad_id).values(params={**one, "steps": 0}))
    first = run_inline.again(first_id)
    assert first.status == "succeeded" and "batched_with" not in first.result
    bad = run_inline.again(bad_id)  # its own message: it fails, naming the field
    assert bad.status == "failed" and "steps" in bad.error


def test_row_cap_and_coalesce_off(run_inline, sqlite_settings, tiny_sd_dir):
    capped = dataclasses.replace(sqlite_settings, coalesce_max_rows=3)
    jobs = run_queued(run_inline, *[("sd.txt2img", {**BASE, "prompts": [f"a rose {i}"]}) for i in range(4)],
                      settings=capped)
    assert [j.status for j in jobs] == ["succeeded", "succeeded", "succeeded", "queued"]
    assert jobs[0].result["batch_rows"] == 3
    # A job of two rows does not fit beside two of one row under a cap of 3.
    off = dataclasses.replace(sqlite_settings, coalesce=False)
    jobs = run_queued(run_inline, ("sd.txt2img", {**BASE, "prompts": ["a fox"]}),
                      ("sd.txt2img", {**BASE, "prompts": ["a boat"]}), settings=off)
    assert [j.status for j in jobs] == ["succeeded", "queued"] and "batched_with" not in jobs[0].result


def test_cancel_one_job_of_a_running_batch(run_inline, sqlite_settings, alone, tiny_sd_dir, monkeypatch):
    from worker.context import JobContext

    params = [{**BASE, "prompts": [p], "seed": s} for p, s in (("a rose", 1), ("a fox", 2), ("a boat", 3))]
    ids = [queue(run_inline, "sd.txt2img", p) for p in params]
    progress = JobContext.progress

    def cancel_at_step_1(self, step, total, message=None, phase=None):
        if self.job_id == ids[1] and step == 1:  # a user cancels job 2 while the batch runs
            with session_scope(run_inline._sessions(None)) as session:
                session.execute(update(Job).where(Job.id == ids[1]).values(cancel_requested=True))
        return progress(self, step, total, message, phase)

    monkeypatch.setattr(JobContext, "progress", cancel_at_step_1)
    checks_every_step = dataclasses.replace(sqlite_settings, cancel_check_interval_s=0)
    run_inline.again(ids[0], checks_every_step)
    monkeypatch.setattr(JobContext, "progress", progress)
    jobs = [load(run_inline, job_id) for job_id in ids]
    assert [j.status for j in jobs] == ["succeeded", "cancelled", "succeeded"]
    assert not any(a.name.startswith("images/") for a in jobs[1].artifacts)
    for job, p in ((jobs[0], params[0]), (jobs[2], params[2])):
        assert close(pixels(job, "images/0000-00.png"), pixels(alone("sd.txt2img", p), "images/0000-00.png"))


def test_sigterm_during_a_batch_requeues_every_job(run_inline, tiny_sd_dir, monkeypatch):
    from worker.context import JobContext

    ids = [queue(run_inline, "sd.txt2img", {**BASE, "prompts": [p]}) for p in ("a rose", "a fox")]
    progress = JobContext.progress

    def sigterm_at_step_1(self, step, total, message=None, phase=None):
        if step == 1:
            self.stopping.set()  # what the worker's SIGTERM handler sets
        return progress(self, step, total, message, phase)

    monkeypatch.setattr(JobContext, "progress", sigterm_at_step_1)
    run_inline.again(ids[0])
    jobs = [load(run_inline, job_id) for job_id in ids]
    assert [(j.status, j.attempt) for j in jobs] == [("queued", 1), ("queued", 1)]
    assert not any(a.name.startswith("images/") for j in jobs for a in j.artifacts)
