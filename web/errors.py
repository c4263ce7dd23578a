"""One error handler: JSON `{"error", "message", "fields"?}` for the API, HTML for pages."""
from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.errors import InvalidTransition, JobNotFound, ScheduleNotFound, SpecError, UploadNotFound
from shared.uploads import human_bytes, upload_error
from web import services

log = logging.getLogger(__name__)


def error_response(status: int, error: str, message: str, fields: dict | None = None):
    body = {"error": error, "message": message}
    if fields:
        body["fields"] = fields
    return jsonify(body), status


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


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

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        # A 400 that names the limit, like every other refused input.
        if request.endpoint == "api.create_upload":
            return spec_error(upload_error(
                f"upload is larger than the {human_bytes(services().settings.upload_max_bytes)} upload limit"
            ))
        reason = f"request body is larger than the {human_bytes(request.max_content_length or 0)} limit"
        if _wants_json():
            return error_response(400, "request_too_large", reason, {"body": reason})
        return render_template("error.html", code=400, message=reason), 400

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
