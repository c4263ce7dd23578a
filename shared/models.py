"""SQLAlchemy models: the job row is the truth that users see."""
from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    BigInteger,
    Float,
    Index,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED

    @property
    def can_retry(self) -> bool:
        return self in (JobStatus.FAILED, JobStatus.CANCELLED)


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class TZDateTime(TypeDecorator):
    """DateTime that is stored as UTC and always comes back timezone-aware
    (SQLite keeps no timezone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        # The jobs list, newest first: all jobs (an admin), and one owner's.
        Index("ix_jobs_created", "created_at"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_jobs_schedule_occurrence"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[str] = mapped_column(String(64))

    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    # When the current progress phase began, so ETA is measured over the phase only.
    progress_started_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    # `attempt` doubles as the fencing token: each claim increments it, and every
    # write by a running execution is conditional on the value it claimed with.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # A running job's claim: its worker's heartbeat pushes this forward; once it
    # has passed, a redelivered message may claim the job again (attempt + 1).
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Times a worker died holding this job (its lease expired); at max_attempts it fails.
    worker_lost: Mapped[int] = mapped_column(Integer, default=0)
    # Times its message was published; the reaper backs off re-publishing by this.
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    # A job a schedule enqueued, and the occurrence it is for: one job per occurrence.
    schedule_id: Mapped[str | None] = mapped_column(
        ForeignKey("schedules.id", ondelete="SET NULL"), nullable=True, index=True
    )
    scheduled_for: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    # The user who owns it (None: made with auth off, in the embedded single-user mode).
    owner_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )
    # A pinned job is never deleted by retention.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    # Webhook: POSTed on the events listed (started, progress, completed), signed with
    # HMAC-SHA256 using webhook_secret (or the server's). The secret is never shown back.
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_events: Mapped[list | None] = mapped_column(JSON, nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(256), nullable=True)

    artifacts: Mapped[list["Artifact"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Artifact.name"
    )
    owner: Mapped["User | None"] = relationship()

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(32))
    content_type: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Upload(Base):
    """A file a user uploaded (a dataset zip, an image, a prompts file), checked on
    the way in. Jobs refer to it as `upload:<id>`; the bytes are in storage under
    `upload_key(id)`."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # "dataset" | "image" | "prompts"
    content_type: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # dataset: num_images, classes, uncompressed_bytes; image: width, height, mode; prompts: num_prompts
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)
    # The user who owns it (None: made with auth off, in the embedded single-user mode).
    owner_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )
    owner: Mapped["User | None"] = relationship()


class MissedRuns(str, enum.Enum):
    """What a schedule does with occurrences that passed while beat was down."""

    SKIP = "skip"  # run only the next future occurrence
    CATCH_UP_ONCE = "catch_up_once"  # one job for the whole missed window


class Overlap(str, enum.Enum):
    """What a schedule does when `max_concurrent` of its jobs are still queued or running."""

    SKIP = "skip"  # drop this occurrence
    QUEUE = "queue"  # hold it, and enqueue it once one of them finishes


class Schedule(Base):
    """A recurring job: a job template enqueued at each occurrence of a cron expression
    in a timezone. Times are stored in UTC; `next_run_at` is the next occurrence to
    enqueue, advanced in the same transaction that inserts its job."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_due", "enabled", "next_run_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    kind: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    missed_runs: Mapped[str] = mapped_column(String(16), default=MissedRuns.SKIP.value)
    max_concurrent: Mapped[int] = mapped_column(Integer, default=1)
    overlap: Mapped[str] = mapped_column(String(16), default=Overlap.SKIP.value)
    next_run_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    # Set while an occurrence waits for a free slot (overlap "queue").
    held_since: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    last_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    skipped_runs: Mapped[int] = mapped_column(Integer, default=0)
    last_skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The user who owns it (None: made with auth off, in the embedded single-user mode).
    owner_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )
    owner: Mapped["User | None"] = relationship()
    # Webhook: POSTed on each of its jobs' events listed (started, progress, completed), signed with
    # HMAC-SHA256 using webhook_secret (or the server's). The secret is never shown back.
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_events: Mapped[list | None] = mapped_column(JSON, nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, onupdate=utcnow)


class User(Base):
    """Someone who signs in (web, with a password) or calls the API (with a token)."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # werkzeug's salted hash; None: this user signs in with API tokens only.
    password_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # Copied into the session cookie at sign-in; a cookie with another value is refused.
    # Sign-out and a password change bump it, so they end every session of the user,
    # copies of the cookie included (a signed cookie cannot be taken back otherwise).
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class ApiToken(Base):
    """An API token: shown once when created, stored as its SHA-256."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so a user can tell their tokens apart in a listing.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)

    user: Mapped[User] = relationship()


class WebhookDelivery(Base):
    """One webhook event for a job: an outbox row written with the status change it
    reports, sent (and retried with backoff) by beat, and kept as the job's delivery log."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(TZDateTime(), nullable=True)


class IdempotencyKey(Base):
    """An `Idempotency-Key` a user sent with a submit or an upload (Stripe's convention),
    written in the transaction that made the resource: the same key again within
    shared/idempotency.py's window gets that resource back instead of a second one."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_key", "key", name="uq_idempotency_keys_owner_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_key: Mapped[str] = mapped_column(String(32))  # the user's id; "-" with auth off
    key: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(32))  # "jobs" | "uploads"
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the request
    resource_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, index=True)


class JobOutcomeCount(Base):
    """Counters for GET /metrics that only grow, as Prometheus expects of a counter or a
    histogram: jobs finished per kind, status and duration bucket (-1: never started),
    with their total run time. Incremented in the transaction that finishes a job, so
    retention deleting old jobs takes nothing away."""

    __tablename__ = "job_outcome_counts"

    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    sum_s: Mapped[float] = mapped_column(Float, default=0.0)
