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


class UnknownKind(SpecError):
    """The job kind is not one this service runs."""


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


class ModelNotFound(DiffqueueError):
    """A model reference resolved to nothing."""


class UploadNotFound(DiffqueueError):
    """An `upload:<id>` reference resolved to nothing, or to an upload of another kind."""


class ScheduleNotFound(DiffqueueError):
    """No schedule with that id."""
