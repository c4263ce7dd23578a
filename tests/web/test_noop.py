"""The `noop` kind: hidden and refused unless DIFFQUEUE_ENABLE_NOOP is on; on, a
normal kind on the cpu queue that a real Executor runs."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import InlineRunner
from tests.web.test_api import submit, total_jobs

SCHEDULE = {"name": "noops", "cron": "0 2 * * *", "kind": "noop", "params": {}}


@pytest.fixture
def noop_settings(sqlite_settings):
    return replace(sqlite_settings, enable_noop=True)


@pytest.fixture
def noop_client(noop_settings):
    from web import create_app

    return create_app(noop_settings).test_client()


def assert_disabled(resp) -> None:
    assert resp.status_code == 400, resp.get_data(as_text=True)[:2000]
    body = resp.get_json()
    assert set(body["fields"]) == {"kind"}
    assert "disabled" in body["fields"]["kind"] and "DIFFQUEUE_ENABLE_NOOP" in body["fields"]["kind"]


def test_off_noop_is_not_listed_and_every_submit_is_refused(client):
    assert "noop" not in {k["kind"] for k in client.get("/api/v1/kinds").get_json()["kinds"]}
    assert 'href="/submit/noop"' not in client.get("/submit").get_data(as_text=True)
    assert client.get("/submit/noop").status_code == 404

    assert_disabled(client.post("/api/v1/jobs", json={"kind": "noop", "params": {}}))
    resp = client.post("/submit/noop", data={"sleep_s": "0"})
    assert resp.status_code == 400 and "DIFFQUEUE_ENABLE_NOOP" in resp.get_data(as_text=True)
    assert_disabled(client.post("/api/v1/schedules", json=SCHEDULE))
    assert total_jobs(client) == 0
    assert client.get("/api/v1/schedules").get_json()["total"] == 0


def test_on_noop_is_a_cpu_kind_with_a_bounded_sleep(noop_client):
    kinds = {k["kind"]: k for k in noop_client.get("/api/v1/kinds").get_json()["kinds"]}
    assert kinds["noop"]["queue"] == "cpu"
    assert kinds["noop"]["schema"]["properties"]["sleep_s"]["maximum"] == 60
    assert 'href="/submit/noop"' in noop_client.get("/submit").get_data(as_text=True)
    resp = noop_client.post("/api/v1/jobs", json={"kind": "noop", "params": {"sleep_s": 61}})
    assert resp.status_code == 400 and "sleep_s" in resp.get_json()["fields"]
    assert noop_client.post("/api/v1/schedules", json=SCHEDULE).status_code == 201


def test_on_a_submitted_noop_runs_through_the_executor_and_succeeds(noop_client, noop_settings):
    job = submit(noop_client, {"sleep_s": 0.05}, kind="noop")
    assert (job["status"], job["queue"]) == ("queued", "cpu")
    done = InlineRunner(noop_settings).again(job["id"])
    assert done.status == "succeeded", done.error
    assert done.result["slept_s"] >= 0.05
    assert done.artifacts == []
    shown = noop_client.get(f"/api/v1/jobs/{job['id']}").get_json()
    assert shown["status"] == "succeeded" and shown["started_at"] and shown["finished_at"]


def test_a_schedule_made_while_on_neither_fires_nor_runs_once_noop_is_off(noop_client, sqlite_settings):
    """The flag is read when a schedule fires and on run-now, not only at creation."""
    from datetime import timedelta

    from shared import schedules
    from shared.broker import make_producer
    from shared.db import make_engine, make_sessionmaker
    from web import create_app

    sid = noop_client.post("/api/v1/schedules", json=SCHEDULE).get_json()["id"]
    off = create_app(sqlite_settings).test_client()  # the same database, the flag now off
    assert_disabled(off.post(f"/api/v1/schedules/{sid}/run-now"))
    sessions = make_sessionmaker(make_engine(sqlite_settings.database_url))
    with sessions() as session:
        due = schedules.get_schedule(session, sid).next_run_at
    made = schedules.tick(sessions, make_producer(sqlite_settings), sqlite_settings, now=due + timedelta(seconds=1))
    assert made == []
    schedule = off.get(f"/api/v1/schedules/{sid}").get_json()
    assert schedule["skipped_runs"] == 1 and "DIFFQUEUE_ENABLE_NOOP" in schedule["last_skip_reason"]
    assert total_jobs(off) == 0


def test_unknown_kind_messages_do_not_list_hidden_kinds(client):
    resp = client.post("/api/v1/jobs", json={"kind": "nop", "params": {}})
    assert resp.status_code == 400
    message = resp.get_json()["fields"]["kind"]
    assert "unknown job kind 'nop'" in message and "sd.txt2img" in message and "noop" not in message
    resp = client.post("/api/v1/schedules", json={**SCHEDULE, "kind": "nop"})
    assert resp.status_code == 400
    message = resp.get_json()["fields"]["kind"]
    assert "unknown job kind 'nop'" in message and "sd.txt2img" in message and "noop" not in message
