"""`diffqueue beat`: Celery beat with a database-backed scheduler, in the manner of
django-celery-beat's DatabaseScheduler. Its one periodic entry runs in the beat
process every `beat_interval_s`: the schedules tick (`shared.schedules.tick`: due
schedules become job rows and `diffqueue.run_job` messages), then the reaper
(`shared.reaper.reap`: jobs of dead workers re-queued, lost messages re-published),
and every `retention_interval_s` retention (`shared.retention.cleanup`: old finished
jobs and unused uploads deleted, objects first). Webhooks go out beside the tick, on
beat's own threads (`shared.webhooks.DeliveryPool`), so a slow receiver never delays it.

Running two beats by mistake is safe: the tick locks each due schedule (see
shared/schedules.py), so an occurrence is enqueued once.
"""
from __future__ import annotations

import logging
import time

from celery import Celery, beat

from shared import liveness, reaper, retention, schedules, webhooks
from shared.broker import make_producer
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.storage import make_storage

log = logging.getLogger(__name__)


class ScheduleTicker(beat.Scheduler):
    """Celery beat's scheduler, with the schedules table as its schedule."""

    def __init__(self, app: Celery, *args, **kwargs):
        self.settings: Settings = app.conf.diffqueue_settings
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))
        self.storage = make_storage(self.settings)
        self.retention_due = 0.0  # time.monotonic() of the next retention run: the first tick
        # Started by the first tick, not here: Celery also builds a scheduler that never
        # ticks, only to print its banner.
        self.deliveries = webhooks.DeliveryPool(self.sessions, self.settings)
        self.deliveries_started = False
        super().__init__(app, *args, **kwargs)
        self.max_interval = self.settings.beat_interval_s

    def setup_schedule(self) -> None:
        """No static entries: the tick reads the schedules table."""

    def tick(self, *args, **kwargs) -> float:
        """Enqueue what is due, reap; return the seconds until the next tick. A failure
        (the database or broker away) is logged, and the next tick tries again."""
        if not self.deliveries_started:
            self.deliveries.start()
            self.deliveries_started = True
        try:
            for job in schedules.tick(self.sessions, self.app, self.settings):
                log.info("schedule %s: enqueued job %s for %s", job.schedule_id, job.id, job.scheduled_for.isoformat())
        except Exception:
            log.exception("schedules tick failed; trying again in %g s", self.settings.beat_interval_s)
        try:
            reaper.reap(self.sessions, self.app, self.settings)
        except Exception:
            log.exception("reaper failed; trying again in %g s", self.settings.beat_interval_s)
        self.run_retention()
        liveness.touch(self.settings.liveness_file)  # the healthcheck's proof that ticks go on
        return self.settings.beat_interval_s

    def run_retention(self) -> None:
        """Retention, once per retention_interval_s. Each run is bounded by the tick
        interval so schedules and the reaper are never held up; a run that stopped at its
        budget with more to delete goes on at the next tick."""
        if time.monotonic() < self.retention_due:
            return
        wait = self.settings.retention_interval_s
        try:
            if retention.cleanup(self.sessions, self.storage, self.settings, budget_s=self.settings.beat_interval_s).more:
                wait = 0.0
        except Exception:
            log.exception("retention failed; trying again in %g s", wait)
        self.retention_due = time.monotonic() + wait

    def close(self) -> None:
        """At SIGTERM or Ctrl-C (Celery calls it twice then): no new webhook sends, and a
        short wait for those in flight."""
        self.deliveries.stop()
        super().close()

    @property
    def info(self) -> str:
        return (f"schedules table and reaper, ticking every {self.settings.beat_interval_s:g} s; "
                f"webhooks on {self.settings.webhook_concurrency} threads")


def run_beat(settings: Settings, loglevel: str = "info") -> None:
    """Run beat in this process until SIGTERM or Ctrl-C."""
    app = make_producer(settings)
    app.conf.diffqueue_settings = settings
    app.Beat(scheduler=ScheduleTicker, loglevel=loglevel, max_interval=settings.beat_interval_s,
             schedule=None).run()
