"""HTML pages: a submit form generated from each kind's schema, the job list and a job page.

The pages poll the JSON API; the full web UI grows from here.
"""
from __future__ import annotations

import json

from flask import Blueprint, redirect, render_template, request, url_for

from shared import jobs
from shared.errors import SpecError
from shared.specs import KINDS, kinds_schema, validate_priority
from web import services
from web.api import healthz

bp = Blueprint("pages", __name__)


def form_fields(schema: dict) -> list[dict]:
    """Flatten a pydantic JSON schema into form field descriptions."""
    fields = []
    required = set(schema.get("required", []))
    # A preset comes first: choosing it fills in the fields below.
    for name, prop in sorted(schema["properties"].items(), key=lambda item: item[0] != "preset"):
        options = prop.get("anyOf", [prop])
        types = {o.get("type") for o in options}
        enum = next((o["enum"] for o in options if "enum" in o), None)
        if "const" in prop:
            enum = [prop["const"]]
        # Objects and lists of objects (ddpm.sample's guidance, ddpm.schedule_plot's schedules) are typed as JSON.
        nested = any("$ref" in o or "$ref" in o.get("items", {}) for o in options)
        item_type = next((o.get("items", {}).get("type") for o in options if o.get("type") == "array"), None)
        # Lists of numbers are typed comma-separated; lists of strings (prompts) one a line.
        widget = "json" if nested else "select" if enum else "checkbox" if "boolean" in types else (
            "lines" if item_type == "string" else "list" if "array" in types
            else "number" if types & {"integer", "number"} else "text")
        fields.append({
            "name": name,
            "label": prop.get("title", name),
            "help": prop.get("description", ""),
            "widget": widget,
            "options": enum or [],
            "default": prop.get("default"),
            "required": name in required,
            "step": "any" if "number" in types else "1",
            "item_type": item_type,
            "also_string": "string" in types,
        })
    return fields


def parse_form(kind: str, form) -> dict:
    """Form strings to JSON params, typed by the schema; empty fields take defaults."""
    schema = KINDS[kind].spec.model_json_schema()
    params = {}
    for f in form_fields(schema):
        raw = form.get(f["name"], "").strip()
        if f["widget"] == "checkbox":
            params[f["name"]] = f["name"] in form
            continue
        if raw == "":
            continue
        if f["widget"] == "json":
            try:
                params[f["name"]] = json.loads(raw)
            except ValueError:
                params[f["name"]] = raw  # the spec names the field and the expected type
        elif f["widget"] == "lines":
            lines = [line.strip() for line in raw.splitlines() if line.strip()]
            # One line in a field that also takes a plain string (negative_prompt) is that string.
            params[f["name"]] = lines[0] if f["also_string"] and len(lines) == 1 else lines
        elif f["widget"] == "list" or (f["widget"] == "number" and "," in raw):
            to_number = float if f["item_type"] == "number" else int
            try:
                params[f["name"]] = [to_number(x) for x in raw.replace(",", " ").split()]
            except ValueError:
                params[f["name"]] = raw
        elif f["widget"] == "number":
            try:
                params[f["name"]] = float(raw) if f["step"] == "any" else int(raw)
            except ValueError:
                params[f["name"]] = raw  # the spec names the field and the expected type
        else:
            params[f["name"]] = raw
    return params


def render_submit(kind: str, values: dict | None = None, errors: dict | None = None, status: int = 200):
    entry = next(k for k in kinds_schema() if k["kind"] == kind)
    values = values or {}
    # A nested field's error ("guidance.color") shows by its form field ("guidance").
    by_field: dict[str, str] = {}
    for path, message in (errors or {}).items():
        field, _, rest = path.partition(".")
        by_field.setdefault(field, f"{rest}: {message}" if rest else message)
    if "preset" in values and entry.get("presets"):
        values = {**entry["presets"].get(values["preset"], {}).get("params", {}), **values}
    return render_template(
        "submit.html",
        kinds=list(KINDS),
        kind=entry,
        fields=form_fields(entry["schema"]),
        values=values,
        errors=by_field,
        presets_json=json.dumps(entry.get("presets", {})),
    ), status


@bp.get("/")
def index():
    return redirect(url_for("pages.submit", kind="ddpm.train"))


@bp.get("/healthz")
def root_healthz():
    return healthz()


@bp.route("/submit/<kind>", methods=["GET", "POST"])
def submit(kind: str):
    if kind not in KINDS:
        return render_template("error.html", code=404, message=f"unknown job kind {kind!r}"), 404
    if request.method == "GET":
        return render_submit(kind, dict(request.args))
    params = parse_form(kind, request.form)
    raw_priority = request.form.get("priority", "").strip() or "0"
    svc = services()
    try:
        try:
            priority = int(raw_priority)
        except ValueError:
            priority = raw_priority  # not a number: validate_priority names the field
        job = jobs.submit(svc.sessions, svc.producer, kind, params, validate_priority(priority))
    except SpecError as exc:
        return render_submit(kind, dict(request.form), exc.fields, status=400)
    return redirect(url_for("pages.job_page", job_id=job.id))


@bp.get("/jobs")
def jobs_page():
    with services().sessions() as session:
        rows, total = jobs.list_jobs(session, request.args.get("status"), request.args.get("kind"), 100)
        return render_template("jobs.html", jobs=rows, total=total)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    with services().sessions() as session:
        job = jobs.get_job(session, job_id)
        return render_template("job.html", job=job, params_json=json.dumps(job.params, indent=2))
