"""One error handler: JSON `{"error", "message", "fields"?}` for the API, HTML for pages."""
from __future__ import annotations

import logging
import secrets

from flask import Flask, jsonify, make_response, render_template, request
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.errors import (IdempotencyConflict, InvalidTransition, JobNotFound, QuotaExceeded, ScheduleNotFound,
                           SpecError, StorageFull, TooLarge, UploadNotFound)
from shared.uploads import human_bytes, upload_too_large
from web import services

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 5


def error_response(status: int, error: str, message: str, fields: dict | None = None, **extra):
    body = {"error": error, "message": message, **extra}
    if fields:
        body["fields"] = fields
    return jsonify(body), status


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def _too_large_reason() -> TooLarge:
    """Which bound a request werkzeug cut off (413) went past."""
    limit, length = request.max_content_length, request.content_length
    if limit is not None and (length is None or length > limit):  # no length: the stream was cut at the limit
        if request.endpoint == "api.create_upload":
            return upload_too_large(
                f"upload is larger than the {human_bytes(services().settings.upload_max_bytes)} upload limit")
        reason = f"request body is larger than the {limit}-byte limit ({human_bytes(limit)})"
    else:  # within the body's bound, so a multipart form's own bounds (werkzeug does not say which)
        reason = (f"the form has more than {request.max_form_parts} parts, or a field larger than "
                  f"{request.max_form_memory_size} bytes")
    return TooLarge(f"body: {reason}", {"body": reason})


def init_app(app: Flask) -> None:
    @app.errorhandler(SpecError)
    def spec_error(exc: SpecError):
        return error_response(400, "invalid_params", str(exc), exc.fields)

    @app.errorhandler(JobNotFound)
    @app.errorhandler(UploadNotFound)
    @app.errorhandler(ScheduleNotFound)
    def not_found(exc: JobNotFound | UploadNotFound | ScheduleNotFound):
        if _wants_json():
            return error_response(404, "not_found", str(exc))
        return render_template("error.html", code=404, message=str(exc)), 404

    @app.errorhandler(TooLarge)
    def too_large(exc: TooLarge):
        if _wants_json():
            return error_response(413, "request_too_large", str(exc), exc.fields)
        return render_template("error.html", code=413, message=str(exc)), 413

    @app.errorhandler(RequestEntityTooLarge)
    def body_too_large(exc: RequestEntityTooLarge):
        # werkzeug's bare 413, worded like every other refusal: the field and the bound.
        return too_large(_too_large_reason())

    @app.errorhandler(QuotaExceeded)
    def over_quota(exc: QuotaExceeded):
        if _wants_json():
            resp, status = error_response(429, "quota_exceeded", str(exc))
        else:
            resp, status = make_response(render_template("error.html", code=429, message=str(exc))), 429
        resp.headers["Retry-After"] = str(exc.retry_after_s)
        return resp, status

    @app.errorhandler(StorageFull)
    def storage_full(exc: StorageFull):
        # A fixed message: the exception's names a storage key, and an S3 error's more.
        log.error("storage is full on %s %s: %s", request.method, request.path, exc)
        reason = "no space left: nothing was stored; try again once space is freed"
        if _wants_json():
            return error_response(507, "insufficient_storage", f"storage: {reason}", {"storage": reason})
        return render_template("error.html", code=507, message=f"Storage is full: {reason}."), 507

    @app.errorhandler(IdempotencyConflict)
    def idempotency_conflict(exc: IdempotencyConflict):
        return error_response(422, "idempotency_conflict", str(exc), exc.fields)

    @app.errorhandler(InvalidTransition)
    def conflict(exc: InvalidTransition):
        return error_response(409, "conflict", str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if _wants_json():
            return error_response(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description)
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_down(exc: Exception):
        # The database cannot be reached (down, restarting, connections cut): a client may
        # try again. The host, port and SQL stay in the log.
        return server_error(503, "unavailable", "the database is unavailable; try again shortly", exc,
                            retry_after_s=DATABASE_RETRY_AFTER_S)

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        return server_error(500, "internal_error", "internal error", exc)


def server_error(status: int, error: str, message: str, exc: Exception, retry_after_s: int | None = None):
    """A 5xx: a generic message with an error id, never the exception's text (which can
    hold SQL, schema, paths, host names); the log has the exception under the same id."""
    error_id = secrets.token_hex(8)
    log.error("error %s on %s %s", error_id, request.method, request.path, exc_info=exc)
    message = f"{message} (error id {error_id})"
    if _wants_json():
        resp, _ = error_response(status, error, message, error_id=error_id)
    else:
        resp = make_response(render_template("error.html", code=status, message=message))
    resp.status_code = status
    if retry_after_s is not None:
        resp.headers["Retry-After"] = str(retry_after_s)
    return resp
