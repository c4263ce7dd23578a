"""Fault injection through real processes on PostgreSQL and a Redis of the test's own
(no persistence, on a free port, stopped and restarted at will). Each test's docstring
says what it injects and what it checks. The reaper runs in beat (shared/reaper.py).

tests/test_e2e.py has the others: a SIGKILLed worker resuming from its checkpoint,
SIGTERM re-queueing a training job, and cancel.
"""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from shared.db import make_engine, make_sessionmaker, upgrade
from shared.models import Job
from tests.conftest import Services, free_port, fresh_pg_database

pytestmark = pytest.mark.e2e

PLOT = {"kind": "ddpm.schedule_plot", "params": {"image_size": 16, "num_timesteps_shown": 2}}
FAST_REAPER = {"beat_interval_s": 0.3, "lease_s": 2.0, "heartbeat_s": 0.5}


class OwnRedis:
    """redis-server on a free loopback port, with no persistence: a restart loses
    every queued message, as a Redis without AOF does."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout != b"PONG\n":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def own_redis(tmp_path):
    if not Path("/usr/bin/redis-server").exists() and subprocess.run(["which", "redis-server"]).returncode:
        pytest.skip("redis-server is not installed")
    redis = OwnRedis(tmp_path)
    yield redis
    if redis.proc and redis.proc.poll() is None:
        redis.kill()


@pytest.fixture
def faults(tmp_path, sqlite_settings, own_redis):
    """Settings on a Postgres database of this test's own (the reaper must see only
    this test's jobs, not the expired leases other tests leave in the shared one) and
    the test's Redis; Services started by the test."""
    with fresh_pg_database("diffqueue_faults") as url:
        upgrade(url)
        settings = replace(sqlite_settings, database_url=url, broker_url=own_redis.url, auth_enabled=True,
                           **FAST_REAPER)
        started: list[Services] = []

        def services(**overrides) -> Services:
            svc = Services(replace(settings, **overrides), tmp_path)
            started.append(svc)
            return svc

        yield services
        for svc in started:
            svc.stop()


def row(svc: Services, job_id: str) -> Job:
    with make_sessionmaker(make_engine(svc.settings.database_url))() as session:
        return session.get(Job, job_id)


def test_a_job_that_kills_every_worker_fails_after_max_attempts(faults, own_redis):
    """Inject: a failpoint SIGKILLs the worker as soon as it claims the job, on every
    attempt; a new worker is started after each death. Check: the reaper re-queues the
    job twice, then fails it with "worker lost 3 times"; a fourth worker does not get
    it (no loop)."""
    own_redis.start()
    svc = faults(max_attempts=3, failpoints="job.claimed=kill")
    svc.start_web()
    svc.start("beat", ["beat"])
    job_id = svc.api("POST", "/jobs", json=PLOT).json()["id"]
    workers = 0
    deadline = time.monotonic() + 120
    while row(svc, job_id).status != "failed":
        assert time.monotonic() < deadline, "\n".join(svc.log(n) for n in svc.procs)
        alive = [p for n, p in svc.procs.items() if n.startswith("worker") and p.poll() is None]
        if not alive and row(svc, job_id).status == "queued":  # re-queued by the reaper: another worker
            assert workers < 3, "re-queued after its third lost worker"
            workers += 1
            svc.start_worker(f"worker{workers}")
        time.sleep(0.2)
    job = row(svc, job_id)
    assert (job.attempt, job.worker_lost) == (3, 3)
    assert job.error.startswith("worker lost 3 times (max_attempts 3)")
    assert workers == 3
    for n in (1, 2, 3):
        assert "failpoint job.claimed" in svc.log(f"worker{n}")

    svc.env["DIFFQUEUE_FAILPOINTS"] = ""
    svc.start_worker("worker4")
    time.sleep(3)
    assert svc.procs["worker4"].poll() is None
    assert row(svc, job_id).status == "failed" and "claimed by" not in svc.log("worker4")


def test_submit_while_redis_is_down_is_accepted_and_runs_once_it_is_back(faults, own_redis):
    """Inject: Redis is not running when the job is submitted. Check: the API answers
    202, the row is committed unpublished, /healthz reports the broker down; once Redis
    is up the reaper publishes it and a worker runs it, once."""
    svc = faults()
    svc.start("web", ["web", "--host", "127.0.0.1", "--port", str(svc.port), "--workers", "1"])
    svc.wait_until("web to answer", lambda: _answers(svc), 60)
    health = svc.api("GET", "/healthz")
    assert health.status_code == 503 and health.json()["checks"]["broker"]["ok"] is False

    resp = svc.api("POST", "/jobs", json=PLOT)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert (row(svc, job_id).status, row(svc, job_id).published_at) == ("queued", None)

    own_redis.start()
    svc.start("beat", ["beat"])
    svc.start_worker()
    job = svc.wait_finished(job_id, timeout_s=120)
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert row(svc, job_id).publish_count >= 1
    assert svc.api("GET", "/healthz").status_code == 200


def _answers(svc: Services) -> bool:
    try:
        svc.api("GET", "/kinds")
        return True
    except Exception:
        return False


def test_redis_restarted_without_persistence_loses_no_job(faults, own_redis):
    """Inject: SIGKILL Redis (no AOF, no RDB) while one job runs and two wait in its
    queue, then start an empty Redis on the same port. Check: the running job finishes,
    the reaper publishes the two lost messages again, the worker resumes consuming after
    its reconnect, and every job ends succeeded, each run once."""
    own_redis.start()
    svc = faults(republish_after_s=3.0)
    svc.start_worker()  # first: its imports (torch) overlap the web's start-up
    svc.start("beat", ["beat"])
    svc.start_web()
    long = {"kind": "ddpm.train", "params": {"preset": "tiny", "max_steps": 60, "sample_steps": 2, "num_samples": 2}}
    running = svc.api("POST", "/jobs", json=long).json()["id"]
    waiting = [svc.api("POST", "/jobs", json=PLOT).json()["id"] for _ in range(2)]
    svc.wait_for(running, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, what="training to run")

    own_redis.kill()
    time.sleep(1)
    own_redis.start()  # empty: the two queued messages are gone

    for job_id in [running, *waiting]:
        job = svc.wait_finished(job_id, timeout_s=180)
        assert job["status"] == "succeeded", (job_id, job["error"])
        assert job["attempt"] == 1, job_id
    assert all(row(svc, j).publish_count >= 2 for j in waiting)  # published again by the reaper
    # The worker is still consuming: a new job runs too.
    after = svc.api("POST", "/jobs", json=PLOT).json()["id"]
    assert svc.wait_finished(after, timeout_s=120)["status"] == "succeeded"


def test_postgres_connections_dropped_mid_job_reconnect(faults, own_redis):
    """Inject: pg_terminate_backend on every connection of the worker, web and beat,
    three times while a training job writes progress, artifacts and heartbeats. Check:
    the job completes once (attempt 1) with its artifacts."""
    import psycopg

    own_redis.start()
    svc = faults(progress_interval_s=0.0)
    svc.start_worker()  # first: its imports (torch) overlap the web's start-up
    svc.start("beat", ["beat"])
    svc.start_web()
    params = {"preset": "tiny", "max_steps": 120, "sample_every": 40, "sample_steps": 2, "num_samples": 2}
    job_id = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": params}).json()["id"]
    svc.wait_for(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, what="training to run")
    dsn = svc.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    terminated = 0
    with psycopg.connect(dsn, autocommit=True) as admin:
        for _ in range(3):
            terminated += sum(r[0] for r in admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall())
            time.sleep(1.0)
    assert terminated >= 3
    job = svc.wait_finished(job_id, timeout_s=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1
    assert {"samples/step-000040.png", "samples/step-000080.png", "loss.png", "samples.png"} <= {
        a["name"] for a in job["artifacts"]}


def test_a_message_outliving_the_visibility_timeout_runs_once(faults, own_redis):
    """Inject: a visibility timeout of 2 s, shorter than the job, and a second idle
    worker: Redis hands the unacknowledged message to it while the first still runs.
    Check: the second delivery finds the lease live and exits without side effects;
    the job runs once (attempt 1)."""
    own_redis.start()
    svc = faults(visibility_timeout_s=2)
    svc.start_worker("worker1")
    svc.start_web()
    params = {"preset": "tiny", "max_steps": 80, "sample_steps": 2, "num_samples": 2}
    job_id = svc.api("POST", "/jobs", json={"kind": "ddpm.train", "params": params}).json()["id"]
    svc.wait_for(job_id, lambda j: j["status"] == "running", what="the first worker to run it")
    svc.start_worker("worker2")
    job = svc.wait_finished(job_id, timeout_s=180)
    assert job["status"] == "succeeded" and job["attempt"] == 1
    svc.wait_until("the redelivery to be dropped", lambda: "not claimable" in svc.log("worker2"), 60)
    assert "claimed by" not in svc.log("worker2")
    names = [a["name"] for a in job["artifacts"]]
    assert len(names) == len(set(names))


def test_cancel_a_running_sampling_job(faults, own_redis, tiny_ddpm_dir):
    """Inject: cancel a ddpm.sample job mid-loop. Check: it stops within two steps of
    the cancel (cooperative, at a step boundary), ends cancelled and is not re-queued
    (the reaper is running), and the worker takes the next job."""
    own_redis.start()
    svc = faults(progress_interval_s=0.0, cancel_check_interval_s=0.0)
    svc.start_worker()  # first: its imports (torch) overlap the web's start-up
    svc.start("beat", ["beat"])
    svc.start_web()
    # The tiny model has 100 timesteps: 32 batches of 100 steps make a long loop.
    params = {"model": "tiny-ddpm", "num_images": 64, "batch_size": 2, "steps": 100, "scheduler": "ddpm"}
    job_id = svc.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": params}).json()["id"]
    job = svc.wait_for(job_id, lambda j: j["status"] != "queued" and (j["progress"]["step"] or 0) >= 20, what="sampling")
    assert job["status"] == "running", job["error"]
    at_cancel = svc.api("POST", f"/jobs/{job_id}/cancel").json()["progress"]["step"]
    job = svc.wait_finished(job_id, timeout_s=60)
    assert job["status"] == "cancelled" and job["error"] == "cancelled by request"
    assert job["progress"]["step"] - at_cancel <= 2, (at_cancel, job["progress"])
    time.sleep(2)  # a few reaper ticks
    again = svc.api("GET", f"/jobs/{job_id}").json()
    assert (again["status"], again["attempt"]) == ("cancelled", 1)

    following = svc.api("POST", "/jobs", json=PLOT).json()["id"]
    assert svc.wait_finished(following, timeout_s=60)["status"] == "succeeded"
