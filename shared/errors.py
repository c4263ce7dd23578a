"""Named exceptions. They carry data, never logic."""


class DiffqueueError(Exception):
    """Base class for errors raised on purpose by diffqueue."""


class DatabaseNotMigrated(DiffqueueError):
    """The database schema is missing or behind the code's Alembic head."""


class SpecError(DiffqueueError):
    """Job params failed validation. `fields` maps a dotted field path to its message."""

    def __init__(self, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.fields = fields or {}


class TooLarge(SpecError):
    """A request body or an upload over its size bound (answered 413); `fields` names it."""


class IdempotencyConflict(SpecError):
    """An Idempotency-Key sent again with a different request (answered 422)."""


class UnknownKind(SpecError):
    """The job kind is not one this service runs."""


class KindDisabled(SpecError):
    """The job kind exists but is switched off in the settings (such as `noop`)."""


class JobNotFound(DiffqueueError):
    """No job with that id."""


class InvalidTransition(DiffqueueError):
    """The job's status does not allow the requested action (cancel a finished job, ...)."""


class JobCancelled(DiffqueueError):
    """Raised inside a runner at a step boundary once a cancel was requested."""


class WorkerShuttingDown(DiffqueueError):
    """Raised inside a runner at a step boundary when its worker is stopping (SIGTERM)."""


class LeaseLost(DiffqueueError):
    """This execution no longer owns the job (its fencing token is stale)."""


class StorageError(DiffqueueError):
    """A storage URL or backend problem."""


class StorageFull(StorageError):
    """A write to storage failed for lack of space (a full disk or quota, or an S3
    service that says it has no space); answered 507 Insufficient Storage."""


class StorageLow(StorageError):
    """Local storage has less free space than DIFFQUEUE_STORAGE_MIN_FREE_BYTES (a
    /healthz finding: writes still work, for now). `public_reason` is what the public
    /healthz says: the bound, not the folder or how much is left."""

    def __init__(self, message: str, public_reason: str):
        super().__init__(message)
        self.public_reason = public_reason


class ModelNotFound(DiffqueueError):
    """A model reference resolved to nothing."""


class UnsafeWeights(DiffqueueError):
    """A model has no safetensors weights (only pickled ones, such as `.bin`), and
    only safetensors are loaded."""


class UploadNotFound(DiffqueueError):
    """An `upload:<id>` reference resolved to nothing, or to an upload of another kind."""


class ScheduleNotFound(DiffqueueError):
    """No schedule with that id."""


class AuthError(DiffqueueError):
    """No such user or token, or not the viewer's to change."""


class QuotaExceeded(DiffqueueError):
    """The owner already has as many queued jobs as allowed; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s
