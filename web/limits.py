"""Input limits of the web layer: body sizes, form parts, and the one JSON parser.

- Bodies: DIFFQUEUE_MAX_REQUEST_BYTES for everything but the two endpoints that take
  files (POST /api/v1/uploads and the submit form), whose multipart bodies may carry
  DIFFQUEUE_UPLOAD_MAX_BYTES plus MULTIPART_SLACK. werkzeug cuts a body off at the
  limit (413) whether or not it declares a length; web/errors.py words the refusal.
- Multipart forms: at most DIFFQUEUE_MAX_FORM_PARTS parts, and no text field longer
  than the body limit.
- JSON: Python's json module takes NaN, Infinity and -Infinity (no JSON has them),
  turns 1e999 into infinity, and recurses once per nesting level, so a body of nested
  brackets is a RecursionError, not a 400. `loads` makes each a SpecError naming the
  field path and the bound, and refuses nesting deeper than DIFFQUEUE_MAX_JSON_DEPTH.
- NUL characters, which PostgreSQL cannot store: in a JSON string or key (`loads`), the
  path, the query or a form field (`refuse_nul`), a 400 naming where.
"""
from __future__ import annotations

import json
import math
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

from shared.config import Settings
from shared.errors import SpecError
from web import services

# Room for the multipart boundaries and part headers around an upload's bytes.
MULTIPART_SLACK = 64 * 1024
# Endpoints whose multipart body carries files, bounded by the upload limit instead.
UPLOAD_ENDPOINTS = {"api.create_upload", "pages.submit"}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
FORM_TYPES = {"application/x-www-form-urlencoded", "multipart/form-data"}


def init_app(app: Flask, settings: Settings) -> None:
    """Call before anything that reads the body (CSRF reads the form), so the limits hold there too."""
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_MEMORY_SIZE=settings.max_request_bytes,
        MAX_FORM_PARTS=settings.max_form_parts,
    )
    app.before_request(_body_limit)
    app.before_request(refuse_nul)


NUL = "\x00"
NUL_REASON = "must not contain NUL (\\x00) characters"


def _nul_error(field: str) -> SpecError:
    return SpecError(f"{field}: {NUL_REASON}", {field: NUL_REASON})


def refuse_nul() -> None:
    """Before every request: a NUL in the path, the query or a form field is a 400 naming
    it. No database column can store one (PostgreSQL refuses it mid-query), and no name,
    id, path or secret here has any use for one. JSON bodies are checked by `loads`.
    POST /api/v1/uploads is left to its view, which reads the file and nothing else."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and NUL in value:
            raise _nul_error(name)
    fields = [request.args]
    if request.method in BODY_METHODS and request.mimetype in FORM_TYPES and request.endpoint != "api.create_upload":
        fields.append(request.form)
    for multi in fields:
        for name, value in multi.items(multi=True):
            if NUL in name:
                raise _nul_error("field name")
            if NUL in value:
                raise _nul_error(name)


def _body_limit() -> None:
    # Only multipart bodies: an urlencoded form is read into memory whole, so it keeps
    # the small limit even where files are taken.
    if request.endpoint in UPLOAD_ENDPOINTS and request.mimetype == "multipart/form-data":
        request.max_content_length = services().settings.upload_max_bytes + MULTIPART_SLACK
    elif request.content_length is None and request.method in BODY_METHODS:
        # A body that declares no length (chunked): werkzeug reads it whole only up to the
        # limit and stops there without a word, so JSON or an urlencoded form would be
        # parsed cut short. Read it now (form parsing reuses the cached bytes); reaching
        # the limit means there was more.
        limit = request.max_content_length
        if limit is not None and len(request.get_data(cache=True)) >= limit:
            raise RequestEntityTooLarge()


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


class _NonFinite:
    """What a NaN / Infinity token parses to, so that the walk can name its path."""

    def __init__(self, token: str):
        self.token = token


def _path(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check(value: Any, path: str, depth: int, max_depth: int) -> None:
    """Raise SpecError at the first non-finite number or container deeper than max_depth."""
    if isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
        token = value.token if isinstance(value, _NonFinite) else "a number too large for a float"
        reason = f"NaN and Infinity are not allowed (got {token}); give a finite number"
        raise SpecError(f"{path or 'body'}: {reason}", {path or "body": reason})
    if isinstance(value, str):
        if NUL in value:
            raise _nul_error(path or "body")
        return
    if isinstance(value, dict):
        if any(NUL in key for key in value):
            raise _nul_error(path or "body")  # in a key: named by the object that holds it
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    if depth > max_depth:
        reason = f"JSON nested deeper than {max_depth} levels"
        raise SpecError(f"{path or 'body'}: {reason}", {path or "body": reason})
    for key, item in items:
        _check(item, _path(path, key), depth + 1, max_depth)


def loads(raw: str | bytes, field: str, max_depth: int) -> Any:
    """`json.loads` of the value of `field` ("" for a whole body, whose keys are then
    the paths). NaN/Infinity and nesting deeper than `max_depth` are a SpecError on the
    path where they are; malformed JSON stays a ValueError for the caller to word."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")  # strictly: json.loads would guess UTF-16/32 from bytes
        except UnicodeDecodeError as exc:
            reason = f"must be UTF-8 encoded JSON: invalid byte at position {exc.start}"
            raise SpecError(f"{field or 'body'}: {reason}", {field or "body": reason}) from None
    try:
        value = json.loads(raw, parse_constant=_NonFinite)
    except RecursionError:  # nesting about a thousand deep: the parser's own recursion ran out
        reason = f"JSON nested deeper than {max_depth} levels"
        raise SpecError(f"{field or 'body'}: {reason}", {field or "body": reason}) from None
    _check(value, field, 1, max_depth)
    return value


def json_body(bare: str | None = None) -> dict:
    """The request's JSON object body, or a SpecError on `body` (or the path) that says why.
    Paths under the top-level key `bare` are named without it: the jobs API names a
    params field `learning_rate`, not `params.learning_rate`, in every error."""
    if not request.is_json:
        reason = f"must be a JSON object sent as application/json, got content type {request.mimetype or 'none'!r}"
        raise SpecError(f"body: {reason}", {"body": reason})
    data = request.get_data(cache=True)  # past max_content_length: a 413 from werkzeug
    if not data.strip():
        raise SpecError("body: must be a JSON object, got an empty body", {"body": "must be a JSON object"})
    try:
        body = loads(data, "", services().settings.max_json_depth)
    except SpecError as exc:
        if bare is None:
            raise
        fields = {k.removeprefix(f"{bare}."): v for k, v in exc.fields.items()}
        raise SpecError("; ".join(f"{k}: {v}" for k, v in fields.items()), fields) from None
    except ValueError as exc:  # malformed JSON, or an integer of more than 4300 digits
        reason = f"must be a JSON object: not valid JSON ({exc})"
        raise SpecError(f"body: {reason}", {"body": reason}) from None
    if not isinstance(body, dict):
        got = JSON_TYPES.get(type(body), type(body).__name__)
        raise SpecError(f"body: must be a JSON object, got {got}", {"body": "must be a JSON object"})
    return body
