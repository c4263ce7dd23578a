"""`GET /metrics`: Prometheus metrics, read from the database at each scrape.

The web runs as several gunicorn processes, each seeing only its own requests, so
in-process counters would each hold a part. The job rows already hold the truth: a
custom collector turns them into gauges with a few GROUP BY queries per scrape, and
keeps no state here. With the Redis broker, the broker's own queue lengths are read
too (LLEN), so a gap between queued rows and queued messages shows.

Jobs finished (a counter) and their run times (a histogram) come from counts that only
grow (shared/outcomes.py: one row per kind, outcome and bucket, incremented as each job
finishes), not from the job rows, which retention deletes; so rate() works, e.g.
`histogram_quantile(0.9, sum by (le, kind) (rate(diffqueue_job_duration_seconds_bucket[1h])))`.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared.broker import MAX_PRIORITY, QUEUES
from shared.config import Settings
from shared import outcomes
from shared.models import Job, JobOutcomeCount, JobStatus, Schedule, WebhookDelivery, utcnow
from shared.specs import KINDS
from web.errors import error_response

bp = Blueprint("metrics", __name__)

# shared/webhooks.py's delivery states, listed so each has a series before its first row.
WEBHOOK_STATES = ("pending", "delivered", "failed")
# A scrape must answer within Prometheus' timeout even when Redis is away.
BROKER_TIMEOUT_S = 1.0


class DatabaseCollector(Collector):
    """The service's state as Prometheus metrics, queried when scraped."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings):
        self.sessions = sessions
        self.queues = sorted(set(QUEUES) | {settings.default_queue} | {k.queue for k in KINDS.values()})
        self.redis = None
        if settings.broker_url.startswith(("redis://", "rediss://")):
            import redis

            self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=BROKER_TIMEOUT_S,
                                              socket_connect_timeout=BROKER_TIMEOUT_S)

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.sessions() as session:
            yield from self._jobs(session)
            yield from self._queues(session, now)
            yield from self._outcomes(session)
            yield from self._leases(session, now)
            yield self._webhooks(session)
            yield self._schedules(session)
        yield from self._broker()

    def _jobs(self, session: Session) -> Iterator[Metric]:
        counts = {(status, kind): n for status, kind, n in
                  session.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind))}
        jobs = GaugeMetricFamily("diffqueue_jobs", "Jobs in the database by status and kind.", labels=["status", "kind"])
        # Every known pair, zeros included, so an alert on a series that is absent until
        # the first failure still works.
        statuses = {s.value for s in JobStatus} | {s for s, _ in counts}
        kinds = set(KINDS) | {k for _, k in counts}
        for status in sorted(statuses):
            for kind in sorted(kinds):
                jobs.add_metric([status, kind], counts.get((status, kind), 0))
        yield jobs

    def _queues(self, session: Session, now: datetime) -> Iterator[Metric]:
        rows = {queue: (n, oldest) for queue, n, oldest in session.execute(
            select(Job.queue, func.count(), func.min(Job.created_at))
            .where(Job.status == JobStatus.QUEUED.value).group_by(Job.queue))}
        depth = GaugeMetricFamily("diffqueue_queue_depth", "Queued jobs (rows) per queue.", labels=["queue"])
        age = GaugeMetricFamily(
            "diffqueue_oldest_queued_age_seconds",
            "Seconds since the oldest queued job of each queue was submitted (0: none waiting).", labels=["queue"])
        for queue in sorted(set(self.queues) | set(rows)):
            n, oldest = rows.get(queue, (0, None))
            depth.add_metric([queue], n)
            age.add_metric([queue], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield depth
        yield age

    def _outcomes(self, session: Session) -> Iterator[Metric]:
        """Jobs finished, and their run times, since the database began: counts that only
        grow (shared/outcomes.py), so rate() and increase() work on them."""
        rows = session.execute(select(JobOutcomeCount.kind, JobOutcomeCount.status, JobOutcomeCount.bucket,
                                      JobOutcomeCount.count, JobOutcomeCount.sum_s)).all()
        finished = CounterMetricFamily("diffqueue_jobs_finished", "Jobs finished, by kind and outcome.",
                                       labels=["kind", "status"])
        per_series: dict[tuple[str, str], dict[int, tuple[int, float]]] = {}
        for kind, status, bucket, count, sum_s in rows:
            per_series.setdefault((kind, status), {})[bucket] = (count, sum_s)
        hist = HistogramMetricFamily(
            "diffqueue_job_duration_seconds", "Run time (finished - started) of finished jobs, by kind and outcome.",
            labels=["kind", "status"])
        for (kind, status), buckets in sorted(per_series.items()):
            finished.add_metric([kind, status], sum(count for count, _ in buckets.values()))
            ran = {b: v for b, v in buckets.items() if b != outcomes.NEVER_STARTED}
            if not ran:
                continue
            cumulative, total = [], 0
            for i, bound in enumerate(outcomes.DURATION_BUCKETS_S):
                total += ran.get(i, (0, 0.0))[0]
                cumulative.append((str(float(bound)), total))
            count = sum(n for n, _ in ran.values())
            hist.add_metric([kind, status], cumulative + [("+Inf", count)], sum(s for _, s in ran.values()))
        yield finished
        yield hist

    def _leases(self, session: Session, now: datetime) -> Iterator[Metric]:
        live = GaugeMetricFamily("diffqueue_running_leases", "Running jobs whose lease is live, per worker.",
                                 labels=["worker"])
        for worker, n in session.execute(
            select(Job.worker, func.count()).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at >= now)
            .group_by(Job.worker).order_by(Job.worker)
        ):
            live.add_metric([worker or ""], n)
        yield live
        expired = session.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.RUNNING.value, or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)))
        yield GaugeMetricFamily(
            "diffqueue_expired_leases",
            "Running jobs whose lease has expired: their worker is gone, and the reaper has yet to re-queue them.",
            value=expired)

    def _webhooks(self, session: Session) -> Metric:
        counts = dict(session.execute(select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)).all())
        family = GaugeMetricFamily("diffqueue_webhook_deliveries",
                                   "Webhook deliveries by state (failed: given up after the last retry).",
                                   labels=["state"])
        for state in sorted(set(WEBHOOK_STATES) | set(counts)):
            family.add_metric([state], counts.get(state, 0))
        return family

    def _schedules(self, session: Session) -> Metric:
        counts = dict(session.execute(select(Schedule.enabled, func.count()).group_by(Schedule.enabled)).all())
        family = GaugeMetricFamily("diffqueue_schedules", "Schedules, enabled or paused.", labels=["enabled"])
        for enabled in (True, False):
            family.add_metric([str(enabled).lower()], counts.get(enabled, 0))
        return family

    def _broker(self) -> Iterator[Metric]:
        """With Redis: each queue's message count (kombu keeps a list per priority step,
        `<queue>` and `<queue>\\x06\\x16<n>`), and whether Redis answered at all."""
        if self.redis is None:
            return
        up = GaugeMetricFamily("diffqueue_broker_up", "1 if the Redis broker answered this scrape, else 0.")
        try:
            pipe = self.redis.pipeline(transaction=False)
            for queue in self.queues:
                for priority in range(MAX_PRIORITY + 1):
                    pipe.llen(f"{queue}{RedisChannel.sep}{priority}" if priority else queue)
            lengths = pipe.execute()
        except Exception:  # reported as broker_up 0, and the database's metrics still served
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        family = GaugeMetricFamily("diffqueue_broker_queue_length",
                                   "Messages waiting in the Redis broker per queue, all priorities.", labels=["queue"])
        steps = MAX_PRIORITY + 1
        for i, queue in enumerate(self.queues):
            family.add_metric([queue], sum(lengths[i * steps:(i + 1) * steps]))
        yield family


@bp.get("/metrics")
def metrics():
    # Counts over every user's jobs: an operator's view, so admins only when auth is on
    # (a scraper gets `diffqueue token create --user prometheus --admin`).
    user = g.get("user")
    if user is not None and not user.is_admin:
        return error_response(403, "forbidden", "GET /metrics needs an admin token (diffqueue token create --admin)")
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions["diffqueue.metrics"]), content_type=content_type)


def init_app(app: Flask) -> None:
    """A registry of this app's own (not prometheus_client's global one), holding only
    the database collector: no process metrics, which would describe one of many workers."""
    svc = app.extensions["diffqueue"]
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(svc.sessions, svc.settings))
    app.extensions["diffqueue.metrics"] = registry
    app.register_blueprint(bp)
