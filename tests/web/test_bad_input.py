"""The bad-input suite (issue 8): each hazard against each endpoint it applies to.

Every case asserts three things:
1. a 4xx error naming the field (the JSON `fields` key, or the form field's error), and
   for a bound, the bound;
2. nothing created or changed: no new job, upload or schedule row, no stored upload,
   and the patched schedule as it was;
3. `GET /healthz` still 200 afterwards.

The params hazards are derived from the kinds' JSON schema (`kinds_schema()`): every
numeric bound just outside, every length and item-count bound one past, every enum and
pattern given a value outside it, every field given a wrong type. A new field or kind is
covered with no edit here. The rest come from issue 8's input limits: body size, form
parts, JSON depth, NaN/Infinity, uploads (zip-slip, symlinks, bombs, pixel cap, formats),
upload and job references, and model references (paths, the hub allowlist, a symlink
out of DIFFQUEUE_MODELS_DIR).

One app serves the whole module (a fresh migrated database per case would take minutes);
each case compares the rows before and after itself.
"""
from __future__ import annotations

import io
import json
import re
import secrets
import tempfile
from dataclasses import dataclass, replace
from html import unescape
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
from sqlalchemy import func, select

from shared.config import Settings
from shared.db import upgrade
from shared.models import Job, Schedule, Upload
from shared.specs import KINDS, kinds_schema
from tests.upload_files import bomb_zip, flat_zip, png_bytes, png_header_only, zip_bytes
from tests.conftest import fresh_pg_database, signed_in
from web.forms import FILE_SUFFIX, form_fields

HUB_ALLOW = "acme/*, google/ddpm-*"
MAX_FILES = 8
# Bases every kind accepts: no hub id (the allowlist above is restrictive) and no
# file the worker would need at submit. `test_the_base_inputs_are_accepted` proves it.
BASES: dict[str, dict[str, Any]] = {
    "ddpm.train": {"max_steps": 4},
    "ddpm.sample": {"model": "local-model"},
    "ddpm.schedule_plot": {},
    "sd.txt2img": {"model": "sd-local", "prompts": ["a cat"]},
    "sd.img2img": {"model": "sd-local", "prompts": ["a cat"], "init_image": "{image}"},
    "sd.sweep": {"model": "sd-local", "prompt": "a cat"},
    "noop": {},
}
# A valid value of each nested object, to carry one bad field.
NESTED_BASES: dict[str, dict[str, Any]] = {"ColorGuidance": {"color": [0.5]}, "NoiseSchedule": {}}
SCHEMAS = {entry["kind"]: entry["schema"] for entry in kinds_schema()}


class Raw:
    """A JSON token json.dumps cannot write (1e999, a 100 000-deep array): spliced in as is."""

    def __init__(self, text: str):
        self.text = text


def dumps(value: Any) -> str:
    raws: list[str] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"__raw_{len(raws) - 1}__"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value))  # NaN and Infinity come out as the bare tokens
    for i, raw in enumerate(raws):
        text = text.replace(f'"__raw_{i}__"', raw)
    return text


# ------------------------------------------------------------------ the environment
@dataclass
class Env:
    settings: Settings
    app: Any
    client: Any
    refs: dict[str, str]  # "image", "prompts", "dataset": upload refs of that kind
    schedule_id: str
    # The state the last refusal left, which is the next one's "before" unless a test
    # that creates things ran in between and called `changed()`. A stale one can only
    # make a case fail, never pass: rows are only ever added.
    last: tuple | None = None

    def changed(self) -> None:
        self.last = None

    def snapshot(self) -> tuple:
        """Row counts, stored upload objects, and the patched schedule's columns."""
        svc = self.app.extensions["diffqueue"]
        counts = [select(func.count()).select_from(m).scalar_subquery() for m in (Job, Upload, Schedule)]
        query = select(*counts, Schedule.kind, Schedule.params, Schedule.priority, Schedule.enabled,
                       Schedule.max_concurrent, Schedule.updated_at).where(Schedule.id == self.schedule_id)
        with svc.sessions() as session:
            row = tuple(session.execute(query).one())
        return row, tuple(svc.storage.list("uploads"))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request, tmp_path_factory) -> Env:
    """The embedded default, and as deployed: PostgreSQL, the Redis broker and limiter,
    auth on (the client sends an admin's token)."""
    if request.param == "sqlite":
        yield make_env(tmp_path_factory.mktemp("bad-input"), {})
        return
    redis_url = request.getfixturevalue("redis_url")
    with fresh_pg_database("diffqueue_bad_input") as url:
        upgrade(url)
        yield make_env(tmp_path_factory.mktemp("bad-input-pg"), {
            "database_url": url, "broker_url": redis_url, "ratelimit_storage_url": redis_url, "auth_enabled": True,
            "secret_key": secrets.token_hex(32)})


def make_env(tmp, deployed: dict) -> Env:
    from web import create_app

    settings = replace(
        Settings.embedded(tmp / "data"), csrf_enabled=False, progress_interval_s=0.0,
        rate_limit="1000000/minute", rate_limit_submit="1000000/minute",  # hundreds of refusals in a few seconds
        hub_models_allow=HUB_ALLOW, upload_max_bytes=64 * 1024, upload_max_files=MAX_FILES,
        upload_max_uncompressed_bytes=1024**2,
        enable_noop=True,  # every kind's hazards, noop's too (tests/web/test_noop.py: noop off)
        **deployed,
    )
    upgrade(settings.database_url)
    # A model folder outside the models dir, and links to it from inside: `escape` (the
    # folder itself) and `linked-org/` (its parent, so `linked-org/secret-model` escapes).
    outside = tmp / "outside" / "secret-model"
    outside.mkdir(parents=True)
    (outside / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    models = settings.models_dir
    (models / "real-model").mkdir(parents=True)
    (models / "real-model" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (models / "escape").symlink_to(outside)
    (models / "linked-org").symlink_to(outside.parent)
    (models / "inside-link").symlink_to(models / "real-model")  # stays inside: allowed
    (models / "notes.txt").write_text("not a model")
    for name in ("local-model", "sd-local"):  # the bases' models: folders, as a name must be
        (models / name).mkdir()

    app = create_app(settings)
    client = app.test_client()
    if settings.auth_enabled:
        signed_in(client, settings)
    refs = {}
    for kind, data, name in [("image", png_bytes(), "cat.png"), ("prompts", b"a cat\n", "p.txt"),
                             ("dataset", flat_zip(2), "d.zip")]:
        resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), name)})
        assert resp.status_code == 201, resp.get_json()
        refs[kind] = resp.get_json()["ref"]
    resp = client.post("/api/v1/schedules", json={"name": "patched", "cron": "0 2 * * *",
                                                  "kind": "ddpm.schedule_plot", "params": {}})
    assert resp.status_code == 201, resp.get_json()
    return Env(settings, app, client, refs, resp.get_json()["id"])


def base(env: Env, kind: str) -> dict[str, Any]:
    return {k: v.format(**env.refs) if isinstance(v, str) else v for k, v in BASES[kind].items()}


def healthy(env: Env) -> None:
    resp = env.client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json()["ok"], resp.get_json()


def refused(env: Env, send: Callable[[], Any], status: int, field: str, fragments: tuple[str, ...] = ()):
    """Send, then check the three things: a JSON 4xx naming `field` (and each fragment,
    such as the bound), nothing created or changed, and /healthz still 200."""
    before, env.last = env.last or env.snapshot(), None
    resp = send()
    body = resp.get_json(silent=True)
    assert resp.status_code == status, (resp.status_code, body or resp.get_data(as_text=True)[:500])
    assert body is not None and set(body) >= {"error", "message"}, resp.get_data(as_text=True)[:500]
    # The field, or a path under it (a depth error names where the nesting went too deep).
    key = next((k for k in body.get("fields", {}) if k == field or k.startswith(field + ".")), None)
    assert key is not None, (field, body)
    for fragment in fragments:
        assert fragment in body["fields"][key], (fragment, body)
    assert env.snapshot() == before
    env.last = before
    healthy(env)
    return body


# ------------------------------------------------------------------ hazards from the schema
@dataclass(frozen=True)
class Hazard:
    """A params hazard: `params` overrides on a kind's base; the error names `path`."""

    kind: str
    name: str
    path: str
    params: dict[str, Any]
    fragments: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.name}-{self.path}"


def _num(value: float | int) -> str:
    """A bound as pydantic words it: 1.0 as "1", 1e6 as "1000000"."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _outside(prop: dict) -> list[tuple[str, Any, Any]]:
    """(side, value just outside, bound) for each numeric bound of `prop`. Integers step
    by their multipleOf, so the bound is the only rule the value breaks."""
    step = prop.get("multipleOf", 1) if prop["type"] == "integer" else None
    out = []
    for key, sign in [("minimum", -1), ("maximum", 1)]:
        if key in prop:
            bound = prop[key]
            delta = step if step is not None else max(1.0, abs(bound)) * 1e-3
            out.append((f"{key[:3]}", bound + sign * delta, bound))
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in prop:
            out.append((f"x{key[9:12].lower()}", prop[key], prop[key]))
    return out


def _valid_item(prop: dict) -> Any:
    """A value that passes `prop` (for a list one item past its maxItems)."""
    if "$ref" in prop:
        return NESTED_BASES[prop["$ref"].rsplit("/", 1)[1]]
    if prop.get("type") in ("integer", "number"):
        return prop.get("minimum", 8)
    return "x"


def schema_hazards(kind: str) -> list[Hazard]:
    schema = SCHEMAS[kind]
    defs = schema.get("$defs", {})
    assert set(defs) <= set(NESTED_BASES), f"add a valid base for {set(defs) - set(NESTED_BASES)} to NESTED_BASES"
    found: list[Hazard] = []

    def walk(prop: dict, path: tuple, wrap: Callable[[Any], dict]):
        takes_bool = any(b.get("type") == "boolean" for b in prop.get("anyOf", [prop]))
        for branch in prop.get("anyOf", [prop]):
            if "$ref" in branch:
                name = branch["$ref"].rsplit("/", 1)[1]
                for key, sub in defs[name]["properties"].items():
                    walk(sub, path + (key,), lambda v, key=key, name=name, wrap=wrap: wrap({**NESTED_BASES[name], key: v}))
                continue
            dotted = ".".join(map(str, path))
            kind_of = branch.get("type")
            if kind_of in ("integer", "number") and "enum" not in branch:
                for side, value, bound in _outside(branch):
                    found.append(Hazard(kind, f"bound-{side}", dotted, wrap(value), (_num(bound),)))
            if kind_of in ("integer", "number") and not takes_bool:
                # JSON's true is not 1 (pydantic's lax mode took it as 1).
                found.append(Hazard(kind, "bool", dotted, wrap(True), ("not a boolean",)))
            if kind_of == "string" and "maxLength" in branch:
                n = branch["maxLength"]
                found.append(Hazard(kind, "too-long", dotted, wrap("x" * (n + 1)), (f"at most {n} character",)))
            if kind_of == "string" and branch.get("minLength", 0) > 0:
                found.append(Hazard(kind, "too-short", dotted, wrap(""), (f"at least {branch['minLength']} character",)))
            if "enum" in branch:
                bad = "not-an-option" if kind_of == "string" else max(branch["enum"]) + 1
                found.append(Hazard(kind, "enum", dotted, wrap(bad), (str(branch["enum"][0]),)))
            if "pattern" in branch:
                found.append(Hazard(kind, "pattern", dotted, wrap("not valid!")))
            if kind_of == "array":
                if "maxItems" in branch:
                    n = branch["maxItems"]
                    found.append(Hazard(kind, "too-many", dotted, wrap([_valid_item(branch["items"])] * (n + 1)),
                                        (f"at most {n} item",)))
                walk(branch["items"], path + (0,), lambda v, wrap=wrap: wrap([v]))

    typed: set[frozenset] = set()
    for name, prop in schema["properties"].items():
        walk(prop, (name,), lambda v, name=name: {name: v})
        # A type no branch of the field takes (an object, else a string), for the first
        # field of each combination of types: the rest take the same path through pydantic.
        types = frozenset(o.get("type", "object") for o in prop.get("anyOf", [prop]))
        if types not in typed:
            typed.add(types)
            wrong = {"wrong": "type"} if "object" not in types else "wrong type"
            found.append(Hazard(kind, "wrong-type", name, {name: wrong}))
    return found


def numeric_leaf(kind: str) -> str:
    """The first top-level numeric field of `kind`."""
    props = SCHEMAS[kind]["properties"]
    return next(n for n, p in props.items() if {o.get("type") for o in p.get("anyOf", [p])} & {"integer", "number"})


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


MODEL_FIELDS = {kind: [n for n, p in s["properties"].items() if p.get("hub_ref") == "model"] for kind, s in SCHEMAS.items()}
UPLOAD_FIELDS = {kind: [(n, p["upload_kind"]) for n, p in s["properties"].items() if p.get("upload_kind")]
                 for kind, s in SCHEMAS.items()}
OTHER_UPLOAD = {"image": "prompts", "prompts": "image", "dataset": "image"}
# (name, value, expected fragments): references that must not lead anywhere.
BAD_MODEL_REFS = [
    ("parent", "../x", ()),
    ("absolute", "/etc", ()),
    ("absolute-file", "/etc/passwd", ()),
    ("dot-segments", "acme/../../etc", ()),
    ("backslash", "acme\\..\\x", ()),
    ("home", "~/models", ()),
    ("hub-not-allowed", "evil/model", ("not allowed", HUB_ALLOW)),
    ("hub-case-differs", "ACME/model", ("not allowed",)),
    ("symlink-out", "escape", ("leads out",)),
    ("symlink-parent-out", "linked-org/secret-model", ("leads out",)),
    ("not-a-folder", "notes.txt", ("not a folder",)),
    ("no-such-folder", "tyni-sd", ("not a folder under DIFFQUEUE_MODELS_DIR", "not a hub id")),
]


def param_hazards() -> list[Hazard]:
    out: list[Hazard] = []
    seen_model_fields: set[str] = set()
    for kind in KINDS:
        out += schema_hazards(kind)
        out.append(Hazard(kind, "unknown-field", "not_a_field", {"not_a_field": 1}, ("Extra inputs",)))
        leaf = numeric_leaf(kind)
        for token in ("NaN", "Infinity", "-Infinity", "1e999"):
            out.append(Hazard(kind, f"non-finite-{token}", leaf, {leaf: Raw(token)}, ("NaN and Infinity",)))
        # Depth is counted from the body: {"params": {leaf: [...]}} is 3 levels before the list.
        out.append(Hazard(kind, "too-deep", leaf, {leaf: deep(25)}, ("deeper than 20 levels",)))
        out.append(Hazard(kind, "far-too-deep", "body", {leaf: Raw("[" * 100_000 + "]" * 100_000)},
                          ("deeper than 20 levels",)))
        for field in MODEL_FIELDS[kind]:
            # Every reference once per field definition; a kind that shares the definition
            # (the three SD kinds' model and vae) gets two, which show its submit checks it.
            definition = field + json.dumps(SCHEMAS[kind]["properties"][field], sort_keys=True)
            refs = BAD_MODEL_REFS if definition not in seen_model_fields else [
                r for r in BAD_MODEL_REFS if r[0] in ("hub-not-allowed", "symlink-out")]
            seen_model_fields.add(definition)
            for name, value, fragments in refs:
                out.append(Hazard(kind, f"model-{name}", field, {field: value}, fragments))
        for field, upload_kind in UPLOAD_FIELDS[kind]:
            # prompts_upload replaces the base's prompts (the spec takes one or the other).
            alone = {"prompts": None} if field == "prompts_upload" else {}
            out.append(Hazard(kind, "upload-unknown", field, {**alone, field: "upload:" + "0" * 32}, ("not found",)))
            out.append(Hazard(kind, "upload-malformed", field, {**alone, field: "upload:../../etc/passwd"}))
            out.append(Hazard(kind, "upload-wrong-kind", field,
                              {**alone, field: "{" + OTHER_UPLOAD[upload_kind] + "}"}, ("expected",)))
    out.append(Hazard("ddpm.train", "hub-dataset-not-allowed", "dataset", {"dataset": "hf:evil/data"},
                      ("not allowed", HUB_ALLOW)))
    out.append(Hazard("ddpm.train", "hub-dataset-no-org-not-allowed", "dataset", {"dataset": "hf:fashion_mnist"},
                      ("not allowed",)))
    out.append(Hazard("ddpm.sample", "unknown-job-model", "model", {"model": "job:" + "0" * 32}, ("not found",)))
    out.append(Hazard("sd.img2img", "unknown-job-image", "init_image", {"init_image": f"job:{'0' * 32}/a.png"},
                      ("not found",)))
    out.append(Hazard("sd.img2img", "job-image-dot-segments", "init_image",
                      {"init_image": f"job:{'0' * 32}/../../etc/passwd"}, ("relative",)))
    return out


PARAM_HAZARDS = param_hazards()


def _resolve(env: Env, value: Any) -> Any:
    """`{image}` etc. stand for the env's upload refs of that kind."""
    if isinstance(value, str) and re.fullmatch(r"\{(image|prompts|dataset)\}", value):
        return env.refs[value[1:-1]]
    return value


def params_of(env: Env, h: Hazard) -> dict[str, Any]:
    return {**base(env, h.kind), **{k: _resolve(env, v) for k, v in h.params.items()}}


# Each JSON endpoint that takes job params: (how to send them, how the error names a params field).
def _post_job(env, kind, params):
    return env.client.post("/api/v1/jobs", data=dumps({"kind": kind, "params": params}),
                           content_type="application/json")


def _post_schedule(env, kind, params):
    return env.client.post("/api/v1/schedules", data=dumps({"name": "bad", "cron": "0 2 * * *", "kind": kind,
                                                           "params": params}), content_type="application/json")


def _patch_schedule(env, kind, params):
    return env.client.patch(f"/api/v1/schedules/{env.schedule_id}", data=dumps({"kind": kind, "params": params}),
                            content_type="application/json")


PARAMS_ENDPOINTS = {
    "POST-jobs": (_post_job, ""),
    "POST-schedules": (_post_schedule, "params."),
    "PATCH-schedule": (_patch_schedule, "params."),
}


@pytest.mark.parametrize("endpoint", list(PARAMS_ENDPOINTS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_base_inputs_are_accepted(env, endpoint, kind):
    """The control: each kind's base params pass every endpoint, so a refusal below is the hazard's."""
    env.changed()
    send, _ = PARAMS_ENDPOINTS[endpoint]
    resp = send(env, kind, base(env, kind))
    assert resp.status_code in (200, 201, 202), resp.get_json()


@pytest.mark.parametrize("endpoint", list(PARAMS_ENDPOINTS))
@pytest.mark.parametrize("hazard", PARAM_HAZARDS, ids=[h.id for h in PARAM_HAZARDS])
def test_params_hazard(env, endpoint, hazard):
    send, prefix = PARAMS_ENDPOINTS[endpoint]
    field = hazard.path if hazard.path == "body" else prefix + hazard.path
    refused(env, lambda: send(env, hazard.kind, params_of(env, hazard)), 400, field, hazard.fragments)


# ------------------------------------------------------------------ whole bodies (the JSON endpoints)
BODY_BASES = {
    "POST-jobs": ("post", "/api/v1/jobs", {"kind": "ddpm.schedule_plot", "params": {}}),
    "POST-schedules": ("post", "/api/v1/schedules", {"name": "bad", "cron": "0 2 * * *", "kind": "ddpm.schedule_plot",
                                                     "params": {}}),
    "PATCH-schedule": ("patch", "/api/v1/schedules/{schedule_id}", {"enabled": False}),
}
MIB = 1024 * 1024
LIMIT = ("1048576-byte limit",)
# (name, raw body or overrides of the endpoint's base body, content type, status, field, fragments)
BODY_HAZARDS = [
    ("oversize", b'{"name": "' + b"x" * MIB + b'"}', "application/json", 413, "body", LIMIT),
    ("wrong-content-type", b'{"enabled": false}', "text/plain", 400, "body", ("application/json",)),
    ("form-encoded", b"kind=ddpm.train", "application/x-www-form-urlencoded", 400, "body", ("application/json",)),
    ("no-content-type", b'{"enabled": false}', None, 400, "body", ("application/json",)),
    ("invalid-utf8", b'{"name": "\xff\xfe"}', "application/json", 400, "body", ("UTF-8",)),
    ("utf16", '{"enabled": false}'.encode("utf-16"), "application/json", 400, "body", ("UTF-8",)),
    ("utf8-bom", b'\xef\xbb\xbf{"enabled": false}', "application/json", 400, "body", ("not valid JSON",)),
    ("malformed", b'{"enabled": fals', "application/json", 400, "body", ("not valid JSON",)),
    ("empty", b"", "application/json", 400, "body", ("JSON object",)),
    ("array", b"[]", "application/json", 400, "body", ("JSON object",)),
    ("string", b'"x"', "application/json", 400, "body", ("JSON object",)),
    ("null", b"null", "application/json", 400, "body", ("JSON object",)),
    ("huge-integer", b'{"priority": 1' + b"0" * 5000 + b"}", "application/json", 400, "body", ("not valid JSON",)),
    ("far-too-deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "body",
     ("deeper than 20 levels",)),
    ("nan-priority", {"priority": Raw("NaN")}, "application/json", 400, "priority", ("NaN and Infinity",)),
    ("infinity-priority", {"priority": Raw("Infinity")}, "application/json", 400, "priority", ("NaN and Infinity",)),
    ("1e999-priority", {"priority": Raw("1e999")}, "application/json", 400, "priority", ("NaN and Infinity",)),
    ("too-deep", {"deep": deep(25)}, "application/json", 400, "deep", ("deeper than 20 levels",)),
    ("priority-high", {"priority": 10}, "application/json", 400, "priority", ("9",)),
    ("priority-low", {"priority": -1}, "application/json", 400, "priority", ("0",)),
    ("priority-string", {"priority": "5"}, "application/json", 400, "priority", ()),
    ("priority-bool", {"priority": True}, "application/json", 400, "priority", ()),
    ("unknown-field", {"bogus": 1}, "application/json", 400, "bogus", ()),
    ("unknown-kind", {"kind": "sd.render"}, "application/json", 400, "kind", ()),
    ("params-not-object", {"params": ["a"]}, "application/json", 400, "params", ()),
]


@pytest.mark.parametrize("endpoint", list(BODY_BASES))
@pytest.mark.parametrize("name, body, content_type, status, field, fragments", BODY_HAZARDS,
                         ids=[h[0] for h in BODY_HAZARDS])
def test_body_hazard(env, endpoint, name, body, content_type, status, field, fragments):
    method, url, base_body = BODY_BASES[endpoint]
    url = url.format(schedule_id=env.schedule_id)
    data = body if isinstance(body, bytes) else dumps({**base_body, **body}).encode()
    headers = {"Content-Type": content_type} if content_type else {}

    def send():
        return env.client.open(url, method=method.upper(), data=data, headers=headers)

    refused(env, send, status, field, fragments)


@pytest.mark.parametrize("endpoint", list(BODY_BASES))
def test_oversize_body_without_a_length_is_cut_off(env, endpoint):
    """A chunked body declares no length: werkzeug stops reading at the limit."""
    method, url, _ = BODY_BASES[endpoint]
    url = url.format(schedule_id=env.schedule_id)
    body = b'{"name": "' + b"x" * (2 * MIB) + b'"}'
    refused(env, lambda: env.client.open(
        url, method=method.upper(), input_stream=io.BytesIO(body), content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"},
    ), 413, "body", LIMIT)


# ------------------------------------------------------------------ query strings
QUERY_HAZARDS = [
    ("limit=0", "limit", "[1, 200]"),
    ("limit=201", "limit", "[1, 200]"),
    ("limit=abc", "limit", "integer"),
    ("limit=1e999", "limit", "integer"),
    ("offset=-1", "offset", "[0, "),
]


@pytest.mark.parametrize("url", ["/api/v1/jobs", "/api/v1/uploads", "/api/v1/schedules"])
@pytest.mark.parametrize("query, field, fragment", QUERY_HAZARDS, ids=[q[0] for q in QUERY_HAZARDS])
def test_query_hazard(env, url, query, field, fragment):
    refused(env, lambda: env.client.get(f"{url}?{query}"), 400, field, (fragment,))


@pytest.mark.parametrize("url", ["/api/v1/jobs?kind=sd.render", "/api/v1/jobs?status=lost",
                                 "/api/v1/uploads?kind=model"])
def test_unknown_filter(env, url):
    refused(env, lambda: env.client.get(url), 400, url.split("?")[1].split("=")[0], ("must be one of",))


# ------------------------------------------------------------------ uploads
def _tiff() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "TIFF")
    return buf.getvalue()


PNG = png_bytes()
UPLOAD_HAZARDS = [
    # (name, file bytes, filename, status, fragments)
    ("zip-slip", zip_bytes({"ok.png": PNG, "../evil.png": PNG}), "d.zip", 400, ("zip-slip",)),
    ("zip-absolute", zip_bytes({"/etc/evil.png": PNG}), "d.zip", 400, ("zip-slip",)),
    ("zip-drive", zip_bytes({"C:/evil.png": PNG}), "d.zip", 400, ("zip-slip",)),
    ("zip-backslash", zip_bytes({"..\\evil.png": PNG}), "d.zip", 400, ("zip-slip",)),
    ("zip-symlink", zip_bytes({"ok.png": PNG, "link.png": b"/etc/passwd"}, symlinks=("link.png",)), "d.zip", 400,
     ("symbolic link",)),
    ("zip-bomb", bomb_zip(2), "d.zip", 400, ("decompression bomb", "exceeds 200")),
    ("zip-too-many-images", flat_zip(MAX_FILES + 1), "d.zip", 400, (f"above the {MAX_FILES}-image limit",)),
    ("zip-uncompressed-total", zip_bytes({f"{i}.png": bytes(600 * 1024) for i in range(2)}), "d.zip", 400,
     ("exceeds the 1.0 MiB limit",)),
    ("zip-non-image", zip_bytes({"run.sh": b"#!/bin/sh\nrm -rf /\n"}), "d.zip", 400, ("not an image",)),
    ("zip-no-images", zip_bytes({"empty/": b""}), "d.zip", 400, ("no images",)),
    ("zip-corrupt", b"PK\x03\x04" + bytes(100), "d.zip", 400, ()),
    ("image-pixel-cap", png_header_only(4097, 4097), "big.png", 400, ("16.8 Mpx limit",)),
    ("image-not-an-image", b"not an image at all", "cat.png", 400, ("not a readable image",)),
    ("image-format-not-allowed", _tiff(), "cat.tiff", 400, (".png .jpg",)),
    ("executable", b"\x7fELF\x02\x01\x01" + bytes(64), "tool", 400, ()),
    ("prompts-not-utf8", b"a cat \xff\xfe\n", "p.txt", 400, ("not utf-8",)),
    ("empty", b"", "e.png", 400, ("empty",)),
    ("oversize", bytes(200 * 1024), "big.zip", 413, ("above the 64.0 KiB upload limit",)),
    ("oversize-within-slack", bytes(100 * 1024), "big.zip", 413, ("larger than the 64.0 KiB upload limit",)),
]


@pytest.mark.parametrize("name, data, filename, status, fragments", UPLOAD_HAZARDS, ids=[h[0] for h in UPLOAD_HAZARDS])
def test_upload_hazard(env, name, data, filename, status, fragments):
    refused(env, lambda: env.client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), filename)}),
            status, "file", fragments)


def test_upload_without_a_file(env):
    refused(env, lambda: env.client.post("/api/v1/uploads", data={"other": "x"}), 400, "file", ("required",))
    refused(env, lambda: env.client.post("/api/v1/uploads", json={"file": "x"}), 400, "file", ("required",))


def test_upload_with_too_many_form_parts(env):
    fields = {f"f{i}": "x" for i in range(env.settings.max_form_parts)}
    refused(env, lambda: env.client.post("/api/v1/uploads", data={**fields, "file": (io.BytesIO(PNG), "a.png")}),
            413, "body", (f"more than {env.settings.max_form_parts} parts",))


def test_oversize_upload_without_a_length(env):
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n\r\n').encode() \
        + bytes(300 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    refused(env, lambda: env.client.post(
        "/api/v1/uploads", input_stream=io.BytesIO(body), content_type=f"multipart/form-data; boundary={boundary}",
        environ_overrides={"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"},
    ), 413, "file", ("upload limit",))


# ------------------------------------------------------------------ the HTML submit form
FORM_FIELDS = {kind: {f["name"]: f for f in form_fields(SCHEMAS[kind])} for kind in KINDS}


def form_value(kind: str, name: str, value: Any) -> str | None:
    """`value` as typed into the form field `name`; None where that widget cannot carry it."""
    widget = FORM_FIELDS[kind][name]["widget"]
    if widget == "json":
        return dumps(value)
    if isinstance(value, dict) or widget == "checkbox":
        return None
    if isinstance(value, list):
        if widget == "lines":
            return "\n".join(map(str, value))
        if widget == "list" and all(isinstance(v, (int, float)) for v in value):
            return ", ".join(map(str, value))
        return None
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, str) and widget in ("number", "list"):
        return None  # a string in a number field: the form's own parse, not a hazard of its own
    return str(value)


def form_of(env: Env, kind: str, params: dict[str, Any]) -> dict[str, str] | None:
    out = {}
    for name, value in {**base(env, kind), **params}.items():
        if value is None:
            continue  # an empty field: the default
        typed = form_value(kind, name, _resolve(env, value))
        if typed is None:
            return None
        out[name] = typed
    return out


def form_error(html: str, field: str) -> str:
    found = re.search(rf'id="e-{re.escape(field)}">(.*?)</small>', html, re.S)
    return unescape(found.group(1)) if found else ""


def refused_form(env: Env, send: Callable[[], Any], status: int, errors: dict[str, tuple[str, ...]]):
    """The form's three checks: the status, each field's error by the field naming each
    fragment (or, for a page-wide refusal under "", the page), nothing created, healthy."""
    before, env.last = env.last or env.snapshot(), None
    resp = send()
    html = resp.get_data(as_text=True)
    assert resp.status_code == status, (resp.status_code, html[:2000])
    for field, fragments in errors.items():
        text = form_error(html, field) if field else unescape(html)
        assert text, f"no error shown by {field}"
        for fragment in fragments:
            assert fragment in text, (field, fragment, text[:500])
    assert env.snapshot() == before
    env.last = before
    healthy(env)


def _form_groups() -> list[tuple[str, str, dict[str, Any], dict[str, tuple[str, ...]]]]:
    """The schema's hazards as one form post per kind and group: every top-level field
    broken the same way at once (a form shows every field's error), so a few posts
    cover every bound. Groups: low, high (numeric bounds), too-long, too-many, enum, pattern."""
    group_of = {"bound-min": "low", "bound-xmin": "low", "bound-max": "high", "bound-xmax": "high"}
    groups: dict[tuple[str, str], tuple[dict, dict]] = {}
    for h in PARAM_HAZARDS:
        group = group_of.get(h.name, h.name)
        if group not in ("low", "high", "too-long", "too-many", "enum", "pattern"):
            continue
        top = h.path.split(".")[0]
        if form_value(h.kind, top, h.params[top]) is None:
            continue
        params, errors = groups.setdefault((h.kind, group), ({}, {}))
        if top not in params:
            params[top] = h.params[top]
            errors[top] = h.fragments
    return [(kind, group, params, errors) for (kind, group), (params, errors) in groups.items()]


FORM_GROUPS = _form_groups()


@pytest.mark.parametrize("kind, group, params, errors", FORM_GROUPS, ids=[f"{g[0]}-{g[1]}" for g in FORM_GROUPS])
def test_form_schema_hazards(env, kind, group, params, errors):
    data = form_of(env, kind, params)
    refused_form(env, lambda: env.client.post(f"/submit/{kind}", data=data), 400, errors)


def _form_only_hazards() -> list[Hazard]:
    """What a form carries differently from JSON: NaN typed into a number field (a float
    field takes it as a float, an integer field refuses it as not an integer), and JSON
    typed into a JSON field (its own depth and NaN checks)."""
    out = []
    for kind in KINDS:
        fields = FORM_FIELDS[kind].values()
        floats = [f["name"] for f in fields if f["widget"] == "number" and f["step"] == "any"]
        ints = [f["name"] for f in fields if f["widget"] == "number" and f["step"] == "1"]
        for token in ("nan", "inf", "-inf", "1e999") if floats else ():
            out.append(Hazard(kind, f"form-non-finite-{token}", floats[0], {floats[0]: Raw(token)},
                              ("NaN and Infinity",)))
        for name in ints[:1]:  # noop has no integer field
            out.append(Hazard(kind, "form-nan-integer", name, {name: Raw("nan")}, ("valid integer",)))
        for name in (f["name"] for f in fields if f["widget"] == "json"):
            out.append(Hazard(kind, "form-json-too-deep", name, {name: deep(25)}, ("deeper than 20 levels",)))
            out.append(Hazard(kind, "form-json-far-too-deep", name, {name: Raw("[" * 100_000 + "]" * 100_000)},
                              ("deeper than 20 levels",)))
            out.append(Hazard(kind, "form-json-nan", name, {name: Raw('{"x": NaN}')}, ("NaN and Infinity",)))
    return out


# References as the JSON endpoints get them, plus what only a form carries.
FORM_HAZARDS = [h for h in PARAM_HAZARDS if h.name.startswith(("model-", "upload-", "hub-", "unknown-job", "job-"))]
FORM_HAZARDS += _form_only_hazards()


@pytest.mark.parametrize("hazard", FORM_HAZARDS, ids=[h.id for h in FORM_HAZARDS])
def test_form_hazard(env, hazard):
    data = form_of(env, hazard.kind, hazard.params)
    assert data is not None, f"the {hazard.kind} form cannot carry {hazard.params}"
    field = hazard.path.split(".")[0]
    refused_form(env, lambda: env.client.post(f"/submit/{hazard.kind}", data=data), 400, {field: hazard.fragments})


FILE_HAZARDS = {
    "dataset": (zip_bytes({"../evil.png": PNG}), "d.zip", "zip-slip"),
    "image": (png_header_only(4097, 4097), "big.png", "16.8 Mpx limit"),
    "prompts": (b"a cat \xff\n", "p.txt", "not utf-8"),
}
FORM_FILES = [(kind, field, upload_kind) for kind, fields in UPLOAD_FIELDS.items() for field, upload_kind in fields]


@pytest.mark.parametrize("kind, field, upload_kind", FORM_FILES, ids=[f"{k}-{f}" for k, f, _ in FORM_FILES])
def test_form_file_hazard(env, kind, field, upload_kind):
    data, filename, fragment = FILE_HAZARDS[upload_kind]
    params = {**base(env, kind), "prompts": None} if field == "prompts_upload" else base(env, kind)
    form = {k: form_value(kind, k, _resolve(env, v)) for k, v in params.items() if v is not None and k != field}
    form[field + FILE_SUFFIX] = (io.BytesIO(data), filename)
    refused_form(env, lambda: env.client.post(f"/submit/{kind}", data=form), 400, {field: (fragment,)})


@pytest.mark.parametrize("priority, fragment", [("10", "[0, 9]"), ("-1", "[0, 9]"), ("nan", "[0, 9]"),
                                                ("1e999", "[0, 9]")])
def test_form_priority(env, priority, fragment):
    data = {**form_of(env, "ddpm.train", {}), "priority": priority}
    refused_form(env, lambda: env.client.post("/submit/ddpm.train", data=data), 400, {"priority": (fragment,)})


def test_form_oversize_body(env):
    """An urlencoded form is read whole, so it keeps the small body limit even where files are taken."""
    data = {**form_of(env, "sd.sweep", {}), "prompt": "x" * MIB}
    refused_form(env, lambda: env.client.post("/submit/sd.sweep", data=data), 413, {"": LIMIT})


def test_form_oversize_multipart_body(env):
    limit = env.settings.upload_max_bytes + 64 * 1024
    data = {**form_of(env, "sd.txt2img", {}), "prompts_upload" + FILE_SUFFIX: (io.BytesIO(bytes(limit + 1)), "p.txt")}
    refused_form(env, lambda: env.client.post("/submit/sd.txt2img", data=data), 413, {"": (f"{limit}-byte limit",)})


def test_form_with_too_many_parts(env):
    data = {**form_of(env, "ddpm.train", {}), **{f"junk{i}": "x" for i in range(env.settings.max_form_parts)},
            "dataset" + FILE_SUFFIX: (io.BytesIO(PNG), "a.png")}
    refused_form(env, lambda: env.client.post("/submit/ddpm.train", data=data), 413,
                 {"": (f"more than {env.settings.max_form_parts} parts",)})


def test_form_for_an_unknown_kind(env):
    refused_form(env, lambda: env.client.post("/submit/sd.render", data={"x": "1"}), 404, {"": ("sd.render",)})


# ------------------------------------------------------------------ what stays allowed
@pytest.mark.parametrize("kind, field, value", [
    ("ddpm.sample", "model", "acme/ddpm-cats"),
    ("ddpm.sample", "model", "google/ddpm-celebahq-256"),
    ("ddpm.sample", "model", "real-model"),
    ("ddpm.sample", "model", "inside-link"),
    ("sd.txt2img", "vae", "acme/vae"),
    ("ddpm.train", "dataset", "hf:acme/butterflies:train"),
])
def test_allowed_references_are_accepted(env, kind, field, value):
    """The refusals above are the rules', not a blanket no: allowed hub ids and folders
    (a link that stays inside the models dir included) are taken."""
    env.changed()
    resp = _post_job(env, kind, {**base(env, kind), field: value})
    assert resp.status_code == 202, resp.get_json()


# ------------------------------------------------------------------ NUL characters
def _nul_routes() -> list[tuple[str, str, str]]:
    """(method, rule, variable): every route variable of the app, each to carry a NUL."""
    from web import create_app

    app = create_app(replace(Settings.embedded(Path(tempfile.mkdtemp()) / "data")), check_schema=False)
    out = []
    for rule in app.url_map.iter_rules():
        for variable in re.findall(r"<(?:[^:>]+:)?([^>]+)>", rule.rule):
            if rule.endpoint != "static":
                out += [(method, rule.rule, variable) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return out


NUL_ROUTES = _nul_routes()


def _url(rule: str, env: Env, nul_in: str | None) -> str:
    """`rule` with a real id in each variable (the env's schedule, an upload) and a NUL in one."""
    def value(match) -> str:
        name = match.group(1)
        if name == nul_in:
            return quote("abc\x00def")
        return {"schedule_id": env.schedule_id, "upload_id": env.refs["image"][7:], "kind": "ddpm.train",
                "action": "pause"}.get(name, "0" * 32)

    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", value, rule)


@pytest.mark.parametrize("method, rule, variable", NUL_ROUTES, ids=[f"{m} {r} {v}" for m, r, v in NUL_ROUTES])
def test_a_nul_in_a_path_is_a_400_naming_it(env, method, rule, variable):
    refused(env, lambda: env.client.open(_url(rule, env, variable), method=method), 400, variable, ("NUL",))


@pytest.mark.parametrize("url", ["/api/v1/jobs?status=queued%00", "/api/v1/uploads?kind=%00", "/jobs?kind=a%00",
                                 "/api/v1/jobs?limit=5&x%00=1", "/login?next=/jobs%00"])
def test_a_nul_in_a_query_is_a_400_naming_it(env, url):
    name = re.search(r"[?&]([^=&]*)=[^&]*%00", url)
    refused(env, lambda: env.client.get(url), 400, name.group(1) if name else "field name", ("NUL",))


@pytest.mark.parametrize("path, body, field", [
    ("/api/v1/jobs", {"kind": "sd.sweep", "params": {"model": "sd-local", "prompt": "a\x00b"}}, "prompt"),
    ("/api/v1/jobs", {"kind": "ddpm.train\x00", "params": {}}, "kind"),
    ("/api/v1/jobs", {"kind": "ddpm.train", "params": {"max_steps": 4}, "webhook_secret": "s" * 20 + "\x00"},
     "webhook_secret"),
    ("/api/v1/schedules", {"name": "n\x00", "cron": "0 2 * * *", "kind": "ddpm.schedule_plot", "params": {}}, "name"),
    ("/api/v1/schedules", {"name": "n", "cron": "0 2 * * *", "timezone": "UTC\x00", "kind": "ddpm.schedule_plot"},
     "timezone"),
])
def test_a_nul_in_json_is_a_400_naming_it(env, path, body, field):
    refused(env, lambda: env.client.post(path, json=body), 400, field, ("NUL",))


@pytest.mark.parametrize("path, form, field", [
    ("/login", {"user": "admin\x00", "password": "x" * 12}, "user"),
    ("/submit/sd.sweep", {"model": "sd-local", "prompt": "a\x00b"}, "prompt"),
    ("/schedules/new", {"name": "n\x00", "cron": "0 2 * * *", "kind": "ddpm.schedule_plot", "params": "{}"}, "name"),
])
def test_a_nul_in_a_form_is_a_400_naming_it(env, path, form, field):
    refused(env, lambda: env.client.post(path, data=form), 400, field, ("NUL",))
