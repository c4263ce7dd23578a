"""One error handler: JSON `{"error", "message", "fields"?}` for the API, HTML for pages."""
from __future__ import annotations

import logging

from flask import Flask, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.errors import (InvalidTransition, JobNotFound, QuotaExceeded, ScheduleNotFound, SpecError, TooLarge,
                           UploadNotFound)
from shared.uploads import human_bytes, upload_too_large
from web import services

log = logging.getLogger(__name__)


def error_response(status: int, error: str, message: str, fields: dict | None = None):
    body = {"error": error, "message": message}
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

    @app.errorhandler(InvalidTransition)
    def conflict(exc: InvalidTransition):
        return error_response(409, "conflict", str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if _wants_json():
            return error_response(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description)
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _wants_json():
            return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
        return render_template("error.html", code=500, message=str(exc)), 500
