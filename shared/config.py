"""Settings: the one place that reads DIFFQUEUE_* from the environment.

`Settings.from_env()` is called once by each entry point (CLI, WSGI module, worker
main) and the object is then passed explicitly to `create_app` and `make_celery`.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_QUEUE = "gpu"


class ConfigError(ValueError):
    """Settings that cannot be used (the message says which and why)."""

PREFIX = "DIFFQUEUE_"

# A secret key shorter than this, or with fewer distinct characters, is refused with auth
# on: `secrets.token_hex(32)` gives 64 characters of 16 kinds.
MIN_SECRET_KEY_CHARS = 32
MIN_SECRET_KEY_DISTINCT_CHARS = 8
# Words that mark a key someone copied from an example (compared in lower case, letters
# and digits only): anyone who read the same example could sign a session with it.
PLACEHOLDER_KEY_WORDS = ("changeme", "replaceme", "placeholder", "example", "secretkey", "yoursecret",
                         "notsecret", "insecure", "password", "default")
MAKE_SECRET_KEY = 'python -c "import secrets; print(secrets.token_hex(32))"'


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def secret_key_problem(key: str) -> str | None:
    """What makes `key` unfit to sign sessions, or None (the key itself is never quoted)."""
    if not key:
        return "is not set"
    words = re.sub(r"[^a-z0-9]", "", key.lower())
    if any(word in words for word in PLACEHOLDER_KEY_WORDS):
        return "is a placeholder (like change-me), not a secret"
    if len(key) < MIN_SECRET_KEY_CHARS:
        return f"has {len(key)} characters; at least {MIN_SECRET_KEY_CHARS} are needed"
    if len(set(key)) < MIN_SECRET_KEY_DISTINCT_CHARS:
        return (f"has only {len(set(key))} distinct characters; at least {MIN_SECRET_KEY_DISTINCT_CHARS} "
                "are needed (a random key has many)")
    return None


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
    # Local storage only: /healthz reports storage not ok when its disk has less free.
    storage_min_free_bytes: int = 1024**3
    # Flask's key: it signs session cookies and CSRF tokens (and webhooks' default key is
    # derived from it). Every web process of a service must have the same one, or a
    # sign-in works only on the process that made it; so with auth on the web refuses an
    # empty, placeholder or short one (`check_secret_key`). Empty: none given. The
    # embedded mode makes one (`embedded()`), which `diffqueue up` hands to its children.
    secret_key: str = ""
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
    # ... and the API token they send when the service has auth on.
    api_token: str = ""
    # The address users reach the web at, e.g. https://diffqueue.example.com: the absolute
    # URLs in the API's JSON (a job's, its artifacts', an upload's, a schedule's) are built
    # on it, never on a request's Host header, which the client chooses. Empty: paths alone,
    # resolved by the client against the address it called; `diffqueue up` and
    # `diffqueue web` set it to the address they serve on (not on a wildcard host).
    public_url: str = ""
    # How many reverse proxies in front of the web set X-Forwarded-For, -Proto and -Host:
    # werkzeug's ProxyFix takes the client's address and scheme from that many hops.
    # 0 trusts none of these headers (anyone could send them).
    proxy_hops: int = 0
    # Uploads (POST /api/v1/uploads): the request body, the images in a dataset zip,
    # their declared uncompressed total, pixels per image, and each member's
    # uncompressed/compressed ratio (a decompression-bomb guard).
    upload_max_bytes: int = 1024**3
    upload_max_files: int = 100_000
    upload_max_uncompressed_bytes: int = 4 * 1024**3
    upload_max_pixels: int = 4096 * 4096
    upload_max_ratio: float = 200.0
    # Images in a dataset zip whose headers the web process decodes at upload (a sample
    # spread over the archive, its first and last entries always among them); every
    # entry's name, size and ratio is checked, and the worker decodes every header again
    # before training. Bounds the web CPU one upload can take.
    upload_inspect_images: int = 1000
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
    # Authentication (API tokens and web logins). Off is allowed only in the embedded
    # single-user mode (a SQLite database); see `check()`.
    auth_enabled: bool = True
    # Session cookies: sent only over HTTPS (on behind a TLS proxy; off, a browser on plain
    # http:// could not sign in), and refused this long after sign-in however much they
    # are used since (Flask's own default is 31 days).
    secure_cookies: bool = False
    session_lifetime_s: float = 12 * 3600.0
    # How long a web process may keep the user of a token or session it has seen, and a
    # job's JSON (web/cache.py). PostgreSQL tells it at once of a revoked token, a changed
    # user or job; this bounds what it keeps if it missed that. 0 keeps nothing.
    web_cache_s: float = 30.0
    # Rate limits (flask-limiter syntax), per user (or per address when signed out), kept in
    # ratelimit_storage_url (Redis when the broker is Redis; memory:// otherwise); and the
    # most queued jobs one user may have. A refusal is a 429 with Retry-After.
    rate_limit: str = "1200/minute"
    rate_limit_submit: str = "120/minute"
    rate_limit_login: str = "10/minute"
    ratelimit_storage_url: str = "memory://"
    max_queued_per_user: int = 500
    # Request bodies other than uploads, JSON nesting, and multipart/form parts.
    max_request_bytes: int = 1024 * 1024
    max_json_depth: int = 20
    max_form_parts: int = 200
    # Hugging Face hub model ids a job may load: comma-separated fnmatch patterns.
    hub_models_allow: str = "*"
    # Webhooks: signed with webhook_secret (HMAC-SHA256) unless a job gives its own; a
    # failed delivery is retried with backoff (webhook_backoff_s x 2^n) up to
    # webhook_max_attempts times; progress events at most every webhook_progress_interval_s.
    # Private, loopback and link-local addresses are refused unless webhook_allow_private.
    # webhook_timeout_s bounds a whole delivery (connect, send, response), however slowly
    # the receiver answers; beat sends on webhook_concurrency threads of its own, so slow
    # receivers hold up neither its tick nor each other.
    webhook_secret: str = ""
    webhook_max_attempts: int = 6
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 8
    webhook_progress_interval_s: float = 30.0
    webhook_allow_private: bool = False
    # Retention: finished jobs (not pinned) older than retention_days are deleted with their
    # artifacts, checked every retention_interval_s by beat. 0 keeps everything.
    retention_days: float = 30.0
    retention_interval_s: float = 3600.0
    # Cross-job batching (worker/coalesce.py): a worker that claims a job it can batch
    # (sd.txt2img, sd.sweep, ddpm.sample) also claims compatible queued jobs (same model,
    # size, steps, scheduler), waiting at most coalesce_wait_s for them, up to
    # coalesce_max_rows images per denoising batch. coalesce off runs each job alone.
    coalesce: bool = True
    coalesce_max_rows: int = 16
    coalesce_wait_s: float = 0.05
    # The `noop` job kind (bench/queue.py measures the queue's own overhead with it) is
    # refused at submit and hidden from the kinds list unless enabled.
    enable_noop: bool = False
    # A file a worker (every heartbeat_s) and beat (every tick) touch to show they are alive,
    # for a container healthcheck (`diffqueue alive FILE`): a busy solo worker answers no
    # Celery `inspect ping`. None: no file.
    liveness_file: Path | None = None

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
        database_url = get("DATABASE_URL", defaults.database_url)
        auth_enabled = _bool(get("AUTH", "off" if database_url.startswith("sqlite") else "on"))
        broker_url = get("BROKER_URL", defaults.broker_url)
        return replace(
            defaults,
            database_url=database_url,
            broker_url=broker_url,
            storage_url=get("STORAGE_URL", defaults.storage_url),
            models_dir=Path(models_dir) if models_dir else defaults.models_dir,
            s3_endpoint_url=get("S3_ENDPOINT_URL") or None,
            s3_public_endpoint_url=get("S3_PUBLIC_ENDPOINT_URL") or None,
            presign_expiry_s=int(get("PRESIGN_EXPIRY_S", defaults.presign_expiry_s)),
            storage_min_free_bytes=int(get("STORAGE_MIN_FREE_BYTES", defaults.storage_min_free_bytes)),
            # With auth on, none given stays none (refused by the web): a random key per
            # process is what made sign-ins fail on every other gunicorn worker.
            secret_key=get("SECRET_KEY") or ("" if auth_enabled else defaults.secret_key),
            default_queue=get("DEFAULT_QUEUE", defaults.default_queue),
            progress_interval_s=float(get("PROGRESS_INTERVAL_S", defaults.progress_interval_s)),
            cancel_check_interval_s=float(get("CANCEL_CHECK_INTERVAL_S", defaults.cancel_check_interval_s)),
            cache_dir=Path(cache_dir) if cache_dir else defaults.cache_dir,
            torch_threads=int(threads) if threads else None,
            csrf_enabled=_bool(get("CSRF", "1")),
            api_url=get("URL", defaults.api_url),
            api_token=get("TOKEN", defaults.api_token),
            public_url=get("PUBLIC_URL", defaults.public_url).rstrip("/"),
            proxy_hops=int(get("PROXY_HOPS", defaults.proxy_hops)),
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
            upload_inspect_images=int(get("UPLOAD_INSPECT_IMAGES", defaults.upload_inspect_images)),
            beat_interval_s=float(get("BEAT_INTERVAL_S", defaults.beat_interval_s)),
            max_attempts=int(get("MAX_ATTEMPTS", defaults.max_attempts)),
            republish_after_s=float(get("REPUBLISH_AFTER_S", defaults.republish_after_s)),
            schedule_min_interval_s=float(get("SCHEDULE_MIN_INTERVAL_S", defaults.schedule_min_interval_s)),
            schedule_grace_s=float(get("SCHEDULE_GRACE_S", defaults.schedule_grace_s)),
            auth_enabled=auth_enabled,
            secure_cookies=_bool(get("SECURE_COOKIES", "0")),
            session_lifetime_s=float(get("SESSION_LIFETIME_S", defaults.session_lifetime_s)),
            web_cache_s=float(get("WEB_CACHE_S", defaults.web_cache_s)),
            rate_limit=get("RATE_LIMIT", defaults.rate_limit),
            rate_limit_submit=get("RATE_LIMIT_SUBMIT", defaults.rate_limit_submit),
            rate_limit_login=get("RATE_LIMIT_LOGIN", defaults.rate_limit_login),
            ratelimit_storage_url=get("RATELIMIT_STORAGE_URL")
            or (broker_url if broker_url.startswith(("redis://", "rediss://")) else defaults.ratelimit_storage_url),
            max_queued_per_user=int(get("MAX_QUEUED_PER_USER", defaults.max_queued_per_user)),
            max_request_bytes=int(get("MAX_REQUEST_BYTES", defaults.max_request_bytes)),
            max_json_depth=int(get("MAX_JSON_DEPTH", defaults.max_json_depth)),
            max_form_parts=int(get("MAX_FORM_PARTS", defaults.max_form_parts)),
            hub_models_allow=get("HUB_MODELS_ALLOW", defaults.hub_models_allow),
            webhook_secret=get("WEBHOOK_SECRET", defaults.webhook_secret),
            webhook_max_attempts=int(get("WEBHOOK_MAX_ATTEMPTS", defaults.webhook_max_attempts)),
            webhook_backoff_s=float(get("WEBHOOK_BACKOFF_S", defaults.webhook_backoff_s)),
            webhook_timeout_s=float(get("WEBHOOK_TIMEOUT_S", defaults.webhook_timeout_s)),
            webhook_concurrency=int(get("WEBHOOK_CONCURRENCY", defaults.webhook_concurrency)),
            webhook_progress_interval_s=float(
                get("WEBHOOK_PROGRESS_INTERVAL_S", defaults.webhook_progress_interval_s)
            ),
            webhook_allow_private=_bool(get("WEBHOOK_ALLOW_PRIVATE", "0")),
            retention_days=float(get("RETENTION_DAYS", defaults.retention_days)),
            retention_interval_s=float(get("RETENTION_INTERVAL_S", defaults.retention_interval_s)),
            coalesce=_bool(get("COALESCE", "1")),
            coalesce_max_rows=int(get("COALESCE_MAX_ROWS", defaults.coalesce_max_rows)),
            coalesce_wait_s=float(get("COALESCE_WAIT_S", defaults.coalesce_wait_s)),
            enable_noop=_bool(get("ENABLE_NOOP", "0")),
            liveness_file=Path(get("LIVENESS_FILE")) if get("LIVENESS_FILE") else None,
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
            auth_enabled=False,
            secret_key=secrets.token_hex(32),
        )

    def check(self) -> None:
        """Refuse settings that are unsafe together (called by every entry point)."""
        if not self.auth_enabled and not self.database_url.startswith("sqlite"):
            raise ConfigError(
                "DIFFQUEUE_AUTH=off is allowed only in the embedded single-user mode (a SQLite database); "
                f"this one uses {self.database_url.split(':', 1)[0]}"
            )
        url = urlsplit(self.public_url)
        if self.public_url and (url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment):
            raise ConfigError(
                "DIFFQUEUE_PUBLIC_URL must be an http:// or https:// address such as https://diffqueue.example.com, "
                f"got {self.public_url!r}"
            )
        if self.proxy_hops < 0:
            raise ConfigError(f"DIFFQUEUE_PROXY_HOPS must be 0 or more (proxies in front of the web), "
                              f"got {self.proxy_hops}")

    def check_secret_key(self) -> None:
        """Refuse (ConfigError) to serve the web with auth on and no real secret key: with
        none each process would make its own, and a sign-in would work only on the
        process that made it; a well-known one lets anyone sign a session cookie. Auth
        off (the embedded single-user mode) needs no key of its own."""
        if not self.auth_enabled:
            return
        problem = secret_key_problem(self.secret_key)
        if problem is not None:
            raise ConfigError(
                f"DIFFQUEUE_SECRET_KEY {problem}; with auth on every web process must sign sessions with the "
                f"same secret key. Make one with  {MAKE_SECRET_KEY}  and set it for every process of the service"
            )

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url,
            "STORAGE_URL": self.storage_url,
            "PRESIGN_EXPIRY_S": str(self.presign_expiry_s),
            "STORAGE_MIN_FREE_BYTES": str(self.storage_min_free_bytes),
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
            "UPLOAD_INSPECT_IMAGES": str(self.upload_inspect_images),
            "BEAT_INTERVAL_S": str(self.beat_interval_s),
            "MAX_ATTEMPTS": str(self.max_attempts),
            "REPUBLISH_AFTER_S": str(self.republish_after_s),
            "SCHEDULE_MIN_INTERVAL_S": str(self.schedule_min_interval_s),
            "SCHEDULE_GRACE_S": str(self.schedule_grace_s),
            "AUTH": "on" if self.auth_enabled else "off",
            "SECURE_COOKIES": "1" if self.secure_cookies else "0",
            "SESSION_LIFETIME_S": str(self.session_lifetime_s),
            "TOKEN": self.api_token,
            "PROXY_HOPS": str(self.proxy_hops),
            "WEB_CACHE_S": str(self.web_cache_s),
            "RATE_LIMIT": self.rate_limit,
            "RATE_LIMIT_SUBMIT": self.rate_limit_submit,
            "RATE_LIMIT_LOGIN": self.rate_limit_login,
            "RATELIMIT_STORAGE_URL": self.ratelimit_storage_url,
            "MAX_QUEUED_PER_USER": str(self.max_queued_per_user),
            "MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "MAX_JSON_DEPTH": str(self.max_json_depth),
            "MAX_FORM_PARTS": str(self.max_form_parts),
            "HUB_MODELS_ALLOW": self.hub_models_allow,
            "WEBHOOK_SECRET": self.webhook_secret,
            "WEBHOOK_MAX_ATTEMPTS": str(self.webhook_max_attempts),
            "WEBHOOK_BACKOFF_S": str(self.webhook_backoff_s),
            "WEBHOOK_TIMEOUT_S": str(self.webhook_timeout_s),
            "WEBHOOK_CONCURRENCY": str(self.webhook_concurrency),
            "WEBHOOK_PROGRESS_INTERVAL_S": str(self.webhook_progress_interval_s),
            "WEBHOOK_ALLOW_PRIVATE": "1" if self.webhook_allow_private else "0",
            "RETENTION_DAYS": str(self.retention_days),
            "RETENTION_INTERVAL_S": str(self.retention_interval_s),
            "COALESCE": "1" if self.coalesce else "0",
            "COALESCE_MAX_ROWS": str(self.coalesce_max_rows),
            "COALESCE_WAIT_S": str(self.coalesce_wait_s),
            "ENABLE_NOOP": "1" if self.enable_noop else "0",
        }
        optional = {
            "MODELS_DIR": self.models_dir,
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "S3_PUBLIC_ENDPOINT_URL": self.s3_public_endpoint_url,
            "TORCH_THREADS": self.torch_threads,
            "LIVENESS_FILE": self.liveness_file,
            # Only when set: `diffqueue up` gives its web its own address unless the
            # environment names one.
            "PUBLIC_URL": self.public_url or None,
        }
        env.update({k: str(v) for k, v in optional.items() if v is not None})
        return {PREFIX + k: v for k, v in env.items()}
