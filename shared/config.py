"""Settings: the one place that reads DIFFQUEUE_* from the environment.

`Settings.from_env()` is called once by each entry point (CLI, WSGI module, worker
main) and the object is then passed explicitly to `create_app` and `make_celery`.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

DEFAULT_QUEUE = "gpu"
PREFIX = "DIFFQUEUE_"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    storage_url: str
    models_dir: Path | None = None
    s3_endpoint_url: str | None = None
    # Endpoint used only to presign URLs handed to browsers (MinIO behind compose
    # is `http://minio:9000` inside the network but `http://localhost:9000` outside).
    s3_public_endpoint_url: str | None = None
    presign_expiry_s: int = 300
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    default_queue: str = DEFAULT_QUEUE
    # Progress rows are written at most this often (plus the first and last step).
    progress_interval_s: float = 0.5
    # How often a running job re-reads cancel_requested from the DB.
    cancel_check_interval_s: float = 0.5
    # Where a worker keeps models it downloaded from storage (job:<id> references).
    cache_dir: Path = Path("/tmp/diffqueue-cache")
    torch_threads: int | None = None
    csrf_enabled: bool = True
    # A running job's lease, renewed by the worker's heartbeat every heartbeat_s.
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    # Redis only: an unacked message goes back to the queue after this long (kombu's
    # visibility_timeout). A job still holding its lease then is not run twice.
    visibility_timeout_s: int = 3600
    # Stable Diffusion pipelines a worker keeps loaded between jobs (an LRU).
    model_cache_size: int = 2
    # Test-only fault injection, e.g. "checkpoint.published@4=pause" (see worker/failpoints.py).
    failpoints: str = ""
    # Where the CLI's client commands (submit, status, wait, download) find the API.
    api_url: str = "http://127.0.0.1:8000"
    # Uploads (POST /api/v1/uploads): the request body, the images in a dataset zip,
    # their declared uncompressed total, pixels per image, and each member's
    # uncompressed/compressed ratio (a decompression-bomb guard).
    upload_max_bytes: int = 1024**3
    upload_max_files: int = 100_000
    upload_max_uncompressed_bytes: int = 4 * 1024**3
    upload_max_pixels: int = 4096 * 4096
    upload_max_ratio: float = 200.0
    # Schedules: how often beat looks for due schedules; the shortest interval a cron
    # expression may fire at (below 60, a sixth field of seconds is accepted); how late
    # an occurrence may be seen and still run under the `skip` missed-run policy.
    beat_interval_s: float = 5.0
    # The reaper (run by beat on each tick): a job whose worker died is re-queued, and
    # fails once its worker was lost max_attempts times; a queued job nobody claimed is
    # published again after republish_after_s, backing off x2 each time (at most 1 h).
    max_attempts: int = 3
    republish_after_s: float = 300.0
    schedule_min_interval_s: float = 60.0
    schedule_grace_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        data_dir = Path(env.get(PREFIX + "DATA_DIR", "diffqueue-data")).resolve()
        defaults = cls.embedded(data_dir)

        def get(name: str, default=None):
            return env.get(PREFIX + name, default)

        models_dir = get("MODELS_DIR")
        cache_dir = get("CACHE_DIR")
        threads = get("TORCH_THREADS")
        return replace(
            defaults,
            database_url=get("DATABASE_URL", defaults.database_url),
            broker_url=get("BROKER_URL", defaults.broker_url),
            storage_url=get("STORAGE_URL", defaults.storage_url),
            models_dir=Path(models_dir) if models_dir else defaults.models_dir,
            s3_endpoint_url=get("S3_ENDPOINT_URL") or None,
            s3_public_endpoint_url=get("S3_PUBLIC_ENDPOINT_URL") or None,
            presign_expiry_s=int(get("PRESIGN_EXPIRY_S", defaults.presign_expiry_s)),
            secret_key=get("SECRET_KEY") or defaults.secret_key,
            default_queue=get("DEFAULT_QUEUE", defaults.default_queue),
            progress_interval_s=float(get("PROGRESS_INTERVAL_S", defaults.progress_interval_s)),
            cancel_check_interval_s=float(get("CANCEL_CHECK_INTERVAL_S", defaults.cancel_check_interval_s)),
            cache_dir=Path(cache_dir) if cache_dir else defaults.cache_dir,
            torch_threads=int(threads) if threads else None,
            csrf_enabled=_bool(get("CSRF", "1")),
            api_url=get("URL", defaults.api_url),
            lease_s=float(get("LEASE_S", defaults.lease_s)),
            heartbeat_s=float(get("HEARTBEAT_S", defaults.heartbeat_s)),
            visibility_timeout_s=int(get("VISIBILITY_TIMEOUT_S", defaults.visibility_timeout_s)),
            failpoints=get("FAILPOINTS", defaults.failpoints),
            model_cache_size=int(get("MODEL_CACHE_SIZE", defaults.model_cache_size)),
            upload_max_bytes=int(get("UPLOAD_MAX_BYTES", defaults.upload_max_bytes)),
            upload_max_files=int(get("UPLOAD_MAX_FILES", defaults.upload_max_files)),
            upload_max_uncompressed_bytes=int(
                get("UPLOAD_MAX_UNCOMPRESSED_BYTES", defaults.upload_max_uncompressed_bytes)
            ),
            upload_max_pixels=int(get("UPLOAD_MAX_PIXELS", defaults.upload_max_pixels)),
            upload_max_ratio=float(get("UPLOAD_MAX_RATIO", defaults.upload_max_ratio)),
            beat_interval_s=float(get("BEAT_INTERVAL_S", defaults.beat_interval_s)),
            max_attempts=int(get("MAX_ATTEMPTS", defaults.max_attempts)),
            republish_after_s=float(get("REPUBLISH_AFTER_S", defaults.republish_after_s)),
            schedule_min_interval_s=float(get("SCHEDULE_MIN_INTERVAL_S", defaults.schedule_min_interval_s)),
            schedule_grace_s=float(get("SCHEDULE_GRACE_S", defaults.schedule_grace_s)),
        )

    @classmethod
    def embedded(cls, data_dir: Path) -> "Settings":
        """The single-machine default: SQLite DB, SQLite broker, artifacts in a folder."""
        data_dir = Path(data_dir).resolve()
        return cls(
            database_url=f"sqlite:///{data_dir / 'diffqueue.db'}",
            broker_url=f"sqla+sqlite:///{data_dir / 'broker.db'}",
            storage_url=(data_dir / "artifacts").as_uri(),
            models_dir=data_dir / "models",
            cache_dir=data_dir / "cache",
        )

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url,
            "STORAGE_URL": self.storage_url,
            "PRESIGN_EXPIRY_S": str(self.presign_expiry_s),
            "SECRET_KEY": self.secret_key,
            "DEFAULT_QUEUE": self.default_queue,
            "PROGRESS_INTERVAL_S": str(self.progress_interval_s),
            "CANCEL_CHECK_INTERVAL_S": str(self.cancel_check_interval_s),
            "CACHE_DIR": str(self.cache_dir),
            "CSRF": "1" if self.csrf_enabled else "0",
            "LEASE_S": str(self.lease_s),
            "HEARTBEAT_S": str(self.heartbeat_s),
            "VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s),
            "FAILPOINTS": self.failpoints,
            "MODEL_CACHE_SIZE": str(self.model_cache_size),
            "UPLOAD_MAX_BYTES": str(self.upload_max_bytes),
            "UPLOAD_MAX_FILES": str(self.upload_max_files),
            "UPLOAD_MAX_UNCOMPRESSED_BYTES": str(self.upload_max_uncompressed_bytes),
            "UPLOAD_MAX_PIXELS": str(self.upload_max_pixels),
            "UPLOAD_MAX_RATIO": str(self.upload_max_ratio),
            "BEAT_INTERVAL_S": str(self.beat_interval_s),
            "MAX_ATTEMPTS": str(self.max_attempts),
            "REPUBLISH_AFTER_S": str(self.republish_after_s),
            "SCHEDULE_MIN_INTERVAL_S": str(self.schedule_min_interval_s),
            "SCHEDULE_GRACE_S": str(self.schedule_grace_s),
        }
        optional = {
            "MODELS_DIR": self.models_dir,
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "S3_PUBLIC_ENDPOINT_URL": self.s3_public_endpoint_url,
            "TORCH_THREADS": self.torch_threads,
        }
        env.update({k: str(v) for k, v in optional.items() if v is not None})
        return {PREFIX + k: v for k, v in env.items()}
