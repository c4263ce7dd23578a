"""GET /metrics scraped with the test client and parsed as Prometheus text: jobs in
several states (rows as workers leave them, at known times) give exact values, on
SQLite and on Postgres; with the Redis broker, the broker's queue lengths follow real
publishes, and a Redis that does not answer reads broker_up 0."""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from shared.config import Settings
from shared.db import make_engine, make_sessionmaker, session_scope
from shared import jobs as lifecycle
from shared.models import Job, JobOutcomeCount, JobStatus, Schedule, Upload, WebhookDelivery, utcnow
from tests.conftest import free_port, signed_in


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, sqlite_settings) -> Settings:
    if request.param == "sqlite":
        return sqlite_settings
    settings = replace(request.getfixturevalue("prod_settings"), database_url=request.getfixturevalue("own_pg_url"))
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        for model in (Job, Upload, Schedule, JobOutcomeCount):
            session.execute(delete(model))
    return settings


def client_for(settings: Settings):
    from web import create_app

    client = create_app(settings).test_client()
    return signed_in(client, settings) if settings.auth_enabled else client


def scrape(client) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain"), resp.get_data(as_text=True)
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_from_jobs_in_several_states(settings):
    now = utcnow()
    ago = lambda seconds: now - timedelta(seconds=seconds)  # noqa: E731
    rows = [
        # queued: two on gpu (the oldest submitted 100 s ago), one on cpu
        dict(kind="ddpm.train", queue="gpu", status="queued", created_at=ago(100)),
        dict(kind="ddpm.train", queue="gpu", status="queued", created_at=ago(10)),
        dict(kind="ddpm.schedule_plot", queue="cpu", status="queued", created_at=ago(40)),
        # running: two on w1 and one on w2 under live leases, one whose worker is gone
        *[dict(kind="ddpm.sample", queue="gpu", status="running", worker=w, started_at=ago(5),
               lease_expires_at=ago(-30)) for w in ("w1", "w1", "w2")],
        dict(kind="ddpm.train", queue="gpu", status="running", worker="w3", started_at=ago(500),
             lease_expires_at=ago(60)),
        # finished: counted by the counters below only as the lifecycle finishes them
        dict(kind="ddpm.train", queue="gpu", status="succeeded", started_at=ago(130), finished_at=ago(100)),
        dict(kind="ddpm.train", queue="gpu", status="succeeded", started_at=ago(1000), finished_at=ago(600)),
        dict(kind="ddpm.sample", queue="gpu", status="failed", started_at=ago(12), finished_at=ago(10)),
        dict(kind="sd.txt2img", queue="gpu", status="cancelled", finished_at=ago(50)),
        dict(kind="ddpm.train", queue="gpu", status="succeeded", started_at=ago(2 * 86400 + 60),
             finished_at=ago(2 * 86400)),
    ]
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        jobs = [Job(params={}, **row) for row in rows]
        session.add_all(jobs)
        session.flush()
        session.add_all([WebhookDelivery(job_id=jobs[0].id, event="started", state=state)
                         for state in ("pending", "pending", "delivered", "failed")])
        session.add_all([Schedule(name=f"s{i}", cron="0 3 * * *", kind="ddpm.train", params={}, enabled=enabled)
                         for i, enabled in enumerate((True, True, False))])

    m = scrape(client_for(settings))
    jobs_by = {(dict(k)["status"], dict(k)["kind"]): v for k, v in m["diffqueue_jobs"].items()}
    assert {k: v for k, v in jobs_by.items() if v} == {
        ("queued", "ddpm.train"): 2, ("queued", "ddpm.schedule_plot"): 1, ("running", "ddpm.sample"): 3,
        ("running", "ddpm.train"): 1, ("succeeded", "ddpm.train"): 3, ("failed", "ddpm.sample"): 1,
        ("cancelled", "sd.txt2img"): 1,
    }
    assert jobs_by[("failed", "sd.sweep")] == 0  # every known pair is there, zeros included
    assert m["diffqueue_queue_depth"] == {(("queue", "cpu"),): 1, (("queue", "gpu"),): 2}
    age = m["diffqueue_oldest_queued_age_seconds"]
    assert 100 <= age[(("queue", "gpu"),)] < 130 and 40 <= age[(("queue", "cpu"),)] < 70
    assert m["diffqueue_running_leases"] == {(("worker", "w1"),): 2, (("worker", "w2"),): 1}
    assert m["diffqueue_expired_leases"] == {(): 1}
    assert m["diffqueue_webhook_deliveries"] == {(("state", "delivered"),): 1, (("state", "failed"),): 1,
                                                  (("state", "pending"),): 2}
    assert m["diffqueue_schedules"] == {(("enabled", "false"),): 1, (("enabled", "true"),): 2}

    if settings.broker_url.startswith("sqla+"):
        assert "diffqueue_broker_up" not in m  # only the Redis broker is read


def test_finished_jobs_are_counted_by_counters_that_only_grow(settings):
    """Jobs finished through the lifecycle (a worker's finish, a cancel while queued) are
    counted, with their run times, and deleting their rows (retention) takes nothing away:
    Prometheus' rate() needs counters and histograms that never go down."""
    sessions = make_sessionmaker(make_engine(settings.database_url))

    def finished(kind: str, status: JobStatus, ran_s: float) -> str:
        with session_scope(sessions) as session:
            job = Job(kind=kind, params={}, queue="gpu", status="queued")
            session.add(job)
        with sessions() as session:
            token = lifecycle.claim(session, job.id, "w1", 60)
            session.execute(Job.__table__.update().where(Job.id == job.id)
                            .values(started_at=utcnow() - timedelta(seconds=ran_s)))
            session.commit()
            assert lifecycle.finish(session, job.id, token, status, result={})
        return job.id

    [finished("ddpm.train", JobStatus.SUCCEEDED, 25), finished("ddpm.train", JobStatus.SUCCEEDED, 400),
           finished("ddpm.sample", JobStatus.FAILED, 2)]
    with session_scope(sessions) as session:
        queued = Job(kind="sd.txt2img", params={}, queue="gpu", status="queued")
        session.add(queued)
    with session_scope(sessions) as session:
        lifecycle.cancel(session, queued.id)  # finished without running: counted, no run time

    def check(m, train_n: int):
        def bucket(kind, status, le):
            return m["diffqueue_job_duration_seconds_bucket"][(("kind", kind), ("le", le), ("status", status))]

        train, failed = (("kind", "ddpm.train"), ("status", "succeeded")), (("kind", "ddpm.sample"), ("status", "failed"))
        assert m["diffqueue_jobs_finished_total"] == {
            train: train_n, failed: 1, (("kind", "sd.txt2img"), ("status", "cancelled")): 1}
        assert m["diffqueue_job_duration_seconds_count"] == {train: train_n, failed: 1}
        assert m["diffqueue_job_duration_seconds_sum"][train] == pytest.approx(425 + 5 * (train_n - 2), abs=2)
        assert [bucket("ddpm.train", "succeeded", le) for le in ("1.0", "15.0", "30.0", "300.0", "600.0", "+Inf")] \
            == [0, train_n - 2, train_n - 1, train_n - 1, train_n, train_n]
        assert [bucket("ddpm.sample", "failed", le) for le in ("1.0", "5.0", "+Inf")] == [0, 1, 1]

    client = client_for(settings)
    check(scrape(client), 2)
    with session_scope(sessions) as session:
        session.execute(delete(Job))  # retention deletes the rows; the counts stay
    check(scrape(client), 2)
    finished("ddpm.train", JobStatus.SUCCEEDED, 5)
    check(scrape(client), 3)


def test_redis_broker_queue_lengths_follow_publishes(prod_settings, own_pg_url):
    settings = replace(prod_settings, database_url=own_pg_url)
    client = client_for(settings)
    before = scrape(client)
    assert before["diffqueue_broker_up"] == {(): 1}
    for kind, priority in (("ddpm.train", 0), ("ddpm.train", 7), ("ddpm.schedule_plot", 0)):
        resp = client.post("/api/v1/jobs", json={"kind": kind, "params": {}, "priority": priority})
        assert resp.status_code == 202, resp.get_json()
    after = scrape(client)
    length = lambda m, q: m["diffqueue_broker_queue_length"][(("queue", q),)]  # noqa: E731
    # The session's Redis may hold other tests' messages: count what these publishes added.
    assert length(after, "gpu") - length(before, "gpu") == 2  # priorities 0 and 7: two kombu lists
    assert length(after, "cpu") - length(before, "cpu") == 1


def test_a_redis_broker_that_does_not_answer_reads_broker_up_0(prod_settings, own_pg_url):
    settings = replace(prod_settings, database_url=own_pg_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    m = scrape(client_for(settings))
    assert m["diffqueue_broker_up"] == {(): 0}
    assert "diffqueue_broker_queue_length" not in m and "diffqueue_queue_depth" in m  # the rest is served


def test_metrics_need_an_admin_token_when_auth_is_on(prod_settings, own_pg_url):
    """Counts over every user's jobs are an operator's: no token is a 401 (a scraper
    follows no sign-in redirect), a user's token a 403, an admin's token the metrics."""
    from web import create_app

    settings = replace(prod_settings, database_url=own_pg_url)
    app = create_app(settings)
    anonymous = app.test_client().get("/metrics")
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    user = signed_in(app.test_client(), settings, user="carol", admin=False).get("/metrics")
    assert user.status_code == 403 and "admin" in user.get_json()["message"]
    assert "diffqueue_queue_depth" in scrape(signed_in(app.test_client(), settings))
