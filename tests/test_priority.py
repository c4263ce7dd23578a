"""Priority through a real broker and a real worker: higher runs first, on Redis (whose
kombu transport serves the lowest number first) and on the embedded SQLite broker
(whose kombu transport has no priorities of its own); Celery's task events, which
Flower and `celery events` read, are sent; and worker and beat keep their liveness files."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime

import pytest

from shared.broker import make_producer
from tests.conftest import Services

pytestmark = pytest.mark.e2e

PRIORITIES = [0, 9, 5]


class EventLog:
    """Celery's event stream, as `celery events` and Flower read it, in a thread."""

    def __init__(self, settings):
        self.app = make_producer(settings)
        self.events: list[dict] = []
        self.ready = threading.Event()
        self._conn = self.app.connection()
        self._receiver = self.app.events.Receiver(self._conn, handlers={"*": self.events.append})
        self._receiver.on_consume_ready = lambda *args, **kwargs: self.ready.set()
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"limit": None, "timeout": None},
                                        daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "the event receiver did not start"

    def types_by_job(self) -> dict[str, set[str]]:
        """Each job's message's event types: the task id is the message's, the job id its argument."""
        events = list(self.events)
        job_of = {e["uuid"]: e["args"] for e in events if e["type"] in ("task-sent", "task-received")}
        out: dict[str, set[str]] = {}
        for event in events:
            if event.get("uuid") in job_of:
                out.setdefault(job_of[event["uuid"]], set()).add(event["type"])
        return out

    def close(self):
        self._receiver.should_stop = True
        self._thread.join(5)
        self._conn.release()


def _submit_while_no_worker_runs(svc: Services, sleep_s: dict[int, float] | None = None) -> list[str]:
    ids = []
    for priority in PRIORITIES:
        params = {"sleep_s": (sleep_s or {}).get(priority, 0.2)}
        resp = svc.api("POST", "/jobs", json={"kind": "noop", "params": params, "priority": priority})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def _run_order(svc: Services, ids: list[str]) -> list[int]:
    if "worker" not in svc.procs:
        svc.start_worker()
    done = [svc.wait_finished(job_id, timeout_s=120) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in done), done
    return [job["priority"] for job in sorted(done, key=lambda j: datetime.fromisoformat(j["started_at"]))]


def test_redis_runs_the_highest_priority_first_and_celery_sends_task_events(sqlite_settings, redis_url, tmp_path):
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # no message of another test's in these queues
    settings = replace(sqlite_settings, broker_url=redis_url, enable_noop=True)
    svc = Services(settings, tmp_path)
    events = EventLog(settings)
    try:
        svc.start_web()
        ids = _submit_while_no_worker_runs(svc)
        assert _run_order(svc, ids) == [9, 5, 0]

        # The web's publish (task-sent) and the worker's handling of each job's message.
        def all_seen():
            types = events.types_by_job()
            wanted = {"task-sent", "task-received", "task-started", "task-succeeded"}
            return all(wanted <= next((t for args, t in types.items() if job_id in args), set()) for job_id in ids)

        svc.wait_until("every job's task events", all_seen, 30)
    finally:
        events.close()
        svc.stop()


def alive(path, max_age_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", "alive", str(path), "--max-age-s", str(max_age_s)],
                          capture_output=True, text=True, timeout=30)


def test_the_embedded_broker_runs_the_highest_priority_first_and_worker_and_beat_show_they_live(
        sqlite_settings, tmp_path):
    """Also compose's worker and beat healthchecks: `diffqueue alive FILE` passes while a
    worker busy with a job (which a Celery `inspect ping` on the solo pool cannot see) and
    beat keep their DIFFQUEUE_LIVENESS_FILE fresh, and fails once they are gone."""
    svc = Services(replace(sqlite_settings, enable_noop=True, heartbeat_s=0.5, beat_interval_s=0.25), tmp_path)
    worker_file, beat_file = tmp_path / "worker.alive", tmp_path / "beat.alive"
    try:
        svc.start_web()
        ids = _submit_while_no_worker_runs(svc, sleep_s={9: 4.0})
        svc.env["DIFFQUEUE_LIVENESS_FILE"] = str(beat_file)
        svc.start("beat", ["beat"])
        svc.env["DIFFQUEUE_LIVENESS_FILE"] = str(worker_file)
        svc.start_worker()
        assert alive(worker_file, 5).returncode == 1  # not before it is ready (it is importing torch)
        svc.wait_for(ids[1], lambda j: j["status"] == "running", 60, "the first job running")
        time.sleep(2.5)  # the job holds the worker's only thread
        for path in (worker_file, beat_file):
            checked = alive(path, 2)
            assert checked.returncode == 0, checked.stderr
        assert _run_order(svc, ids) == [9, 5, 0]
    finally:
        svc.stop()
    time.sleep(2.5)
    for path in (worker_file, beat_file):
        gone = alive(path, 2)
        assert gone.returncode == 1 and "stuck or gone" in gone.stderr
