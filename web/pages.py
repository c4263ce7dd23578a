"""HTML pages: submit forms generated from each kind's schema, the jobs list, a job's
page, the models page and the schedules page. The list and the job page poll the
JSON API and update themselves (web/static/app.js); every form posts with a CSRF token.
"""
from __future__ import annotations

import json
from datetime import datetime
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, available_timezones

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from shared import jobs, model_catalog, schedules, uploads
from shared.errors import SpecError
from shared.retention import set_pinned
from shared.specs import KINDS, check_kind_enabled, enabled_kinds, kinds_schema
from web import forms, limits, reads, services
from web.auth import current_user, limiter, submit_limit, submit_limited
from web.api import STATUSES, healthz, job_json, schedule_json

bp = Blueprint("pages", __name__)

JOBS_PER_PAGE = 50
# The kind whose form "sample from this model" opens, by the model's pipeline class.
SAMPLE_KIND = {"DDPMPipeline": "ddpm.sample"}
DEFAULT_SAMPLE_KIND = "sd.txt2img"


def sample_kind(pipeline: str | None) -> str:
    return SAMPLE_KIND.get(pipeline or "", DEFAULT_SAMPLE_KIND)


def _family(kind: str) -> str:
    return kind.partition(".")[0]  # "sd", "ddpm"


def _suggestions(svc, kind: str, fields: list[dict]) -> dict[str, list[dict]]:
    """Values offered beside a field: the models that `kind` can load for `model` (local
    folders first, then trained jobs'), recent uploads for upload fields."""
    out: dict[str, list[dict]] = {}
    names = {f["name"]: f for f in fields}
    with svc.sessions() as session:
        if "model" in names:
            models = (model_catalog.list_local_models(svc.settings.models_dir)
                      + model_catalog.list_job_models(session, viewer=current_user()))
            out["model"] = [{"value": m["ref"], "label": f"{m['name']} ({m['pipeline']})"} for m in models
                            if _family(sample_kind(m["pipeline"])) == _family(kind)]
        for f in fields:
            if f["upload_kind"]:
                rows, _ = uploads.list_uploads(session, f["upload_kind"], limit=20, viewer=current_user())
                out[f["name"]] = [{"value": uploads.upload_ref(u.id), "label": u.filename} for u in rows]
    return out


def render_submit(kind: str, values: dict | None = None, errors: dict | None = None, status: int = 200,
                  files_dropped: bool = False):
    entry = next(k for k in kinds_schema(services().settings) if k["kind"] == kind)
    values = values or {}
    # A nested field's error ("guidance.color") shows by its form field ("guidance").
    fields = forms.form_fields(entry["schema"])
    field_names = {f["name"] for f in fields} | {"priority"}
    by_field: dict[str, str] = {}
    general: list[str] = []
    for path, message in (errors or {}).items():
        field, _, rest = path.partition(".")
        if field in field_names:
            by_field.setdefault(field, f"{rest}: {message}" if rest else message)
        else:
            general.append(f"{path}: {message}" if path != "params" else message)
    order = {name: i for i, name in enumerate(entry["main_fields"])}
    main = sorted((f for f in fields if not order or f["name"] in order), key=lambda f: order.get(f["name"], 0))
    more = [f for f in fields if order and f["name"] not in order]
    if "preset" in values and entry.get("presets"):
        values = {**entry["presets"].get(values["preset"], {}).get("params", {}), **values}
    suggestions = _suggestions(services(), kind, fields)
    if suggestions.get("model") and not values.get("model"):
        # A local model first, not the hub id the spec defaults to: a worker with no route
        # to the hub cannot load that, and a filled-in value hides the list of the others.
        values = {**values, "model": suggestions["model"][0]["value"]}
    return render_template(
        "submit.html",
        kind=entry,
        main_fields=main,
        more_fields=more,
        more_open=any(f["name"] in by_field for f in more),
        values=values,
        errors=by_field,
        general_errors=general,
        files_dropped=files_dropped,
        suggestions=suggestions,
        presets=entry.get("presets", {}),
    ), status


@bp.get("/")
def index():
    return redirect(url_for("pages.submit_index"))


@bp.get("/healthz")
def root_healthz():
    return healthz()


@bp.get("/submit")
def submit_index():
    return render_template("submit_index.html", kinds=kinds_schema(services().settings))


@bp.route("/submit/<kind>", methods=["GET", "POST"])
@submit_limited
def submit(kind: str):
    if kind not in KINDS:
        return render_template("error.html", code=404, message=f"unknown job kind {kind!r}"), 404
    svc = services()
    try:
        check_kind_enabled(kind, svc.settings)
    except SpecError as exc:  # hidden from the forms: not found to look at, a bad request to post
        code = 404 if request.method == "GET" else 400
        return render_template("error.html", code=code, message=f"kind: {exc}"), code
    if request.method == "GET":
        values = {}
        if "from" in request.args:  # "submit again with changes": the job's params, pre-filled
            with svc.sessions() as session:
                source = jobs.get_job(session, request.args["from"], current_user())
                if source.kind != kind:
                    return redirect(url_for("pages.submit", kind=source.kind, **request.args))
                values = {**source.params, "priority": source.priority}
        values.update((k, v) for k, v in request.args.items() if k != "from")
        return render_submit(kind, values)

    chosen = forms.chosen_files(kind, request.files)
    raw_priority = request.form.get("priority", "").strip() or "0"
    refs: dict[str, str] = {}
    try:
        params = forms.parse_form(kind, request.form, svc.settings.max_json_depth)
        try:
            priority = int(raw_priority)
        except ValueError:
            priority = raw_priority  # not a number: the door names the field
        # The door's checks before any file is stored, a chosen file standing in as pending:
        # a refused form creates nothing.
        with svc.sessions() as session:
            jobs.admit(session, svc.settings, kind, {**params, **{name: forms.PENDING_UPLOAD for name in chosen}},
                       priority, current_user(), pending=frozenset(chosen))
        refs = forms.save_files(svc, kind, chosen)
        job = jobs.submit(svc.sessions, svc.producer, svc.settings, kind, {**params, **refs}, priority,
                          owner=current_user())
    except SpecError as exc:
        values = {**request.form.to_dict(), **refs}  # a stored file need not be chosen again
        return render_submit(kind, values, exc.fields or {"params": str(exc)}, status=400,
                             files_dropped=bool(set(chosen) - set(refs)))
    return redirect(url_for("pages.job_page", job_id=job.id))


@bp.get("/jobs")
def jobs_page():
    status, kind = request.args.get("status") or None, request.args.get("kind") or None
    status = status if status in STATUSES else None
    kind = kind if kind in KINDS else None
    try:
        offset = max(0, int(request.args.get("offset", 0)))
    except ValueError:
        offset = 0
    with services().sessions() as session:
        rows, total = jobs.list_jobs(session, status, kind, JOBS_PER_PAGE, offset, viewer=current_user())
        initial = [job_json(j, with_artifacts=False) for j in rows]
    return render_template(
        "jobs.html", jobs=initial, total=total, status=status, kind=kind, statuses=STATUSES,
        kinds=list(enabled_kinds(services().settings)), offset=offset, limit=JOBS_PER_PAGE,
    )


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    job = job_json(jobs.get_job(reads(), job_id, current_user(), artifacts=True))
    # The page's script polls the API where the page was loaded from: DIFFQUEUE_PUBLIC_URL
    # may name another origin (127.0.0.1 for a page opened on localhost), which it cannot fetch.
    job["url"] = url_for("api.get_job", job_id=job_id)
    return render_template("job.html", job=job, sample_kind=SAMPLE_KIND["DDPMPipeline"])


def _after_action(job):
    """Scripts get the job as JSON; a plain form post goes back to the page it came
    from (on this site only), or to the job's page."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify(job_json(job)), 202
    back = urlsplit(request.referrer or "")
    same_site = back.path.startswith("/") and back.netloc in ("", request.host)
    return redirect(back.geturl() if same_site else url_for("pages.job_page", job_id=job.id))


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    with services().sessions() as session:
        jobs.get_job(session, job_id, current_user())
        job = jobs.cancel(session, job_id)
        session.commit()
        return _after_action(job)


@bp.post("/jobs/<job_id>/retry")
@submit_limited
def retry_job(job_id: str):
    svc = services()
    jobs.retry_and_publish(svc.sessions, svc.producer, svc.settings, job_id, current_user())
    with svc.sessions() as session:
        return _after_action(jobs.get_job(session, job_id))


@bp.post("/jobs/<job_id>/pin", endpoint="pin_job", defaults={"pinned": True})
@bp.post("/jobs/<job_id>/unpin", endpoint="unpin_job", defaults={"pinned": False})
def pin_job(job_id: str, pinned: bool):
    with services().sessions() as session:
        job = set_pinned(session, job_id, pinned, current_user())
        session.commit()
        return _after_action(job)


@bp.get("/models")
def models_page():
    svc = services()
    local = model_catalog.list_local_models(svc.settings.models_dir)
    with svc.sessions() as session:
        from_jobs = model_catalog.list_job_models(session, viewer=current_user())
    models = [{**m, "sample_kind": sample_kind(m["pipeline"])} for m in local + from_jobs]
    return render_template("models.html", models=models, models_dir=svc.settings.models_dir)



# ------------------------------------------------------------------ schedules
SCHEDULE_DEFAULTS = {"name": "", "cron": "0 2 * * *", "timezone": "UTC", "kind": "sd.txt2img", "params": {},
                     "priority": 0, "enabled": True, "missed_runs": "skip", "max_concurrent": 1, "overlap": "skip"}


def _local(when: str | None, tz: str) -> str:
    """An ISO UTC time as the schedule's wall clock, e.g. "2026-11-24 02:00 CET"."""
    if not when:
        return ""
    return datetime.fromisoformat(when).astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z").replace(":00 ", " ")


def render_schedule_form(values: dict, errors: dict | None = None, status: int = 200):
    # A template error ("params.max_steps") shows by the params field, naming its key.
    by_field: dict[str, str] = {}
    for path, message in (errors or {}).items():
        field, _, rest = path.partition(".")
        by_field.setdefault(field if field in SCHEDULE_DEFAULTS else "params", f"{rest}: {message}" if rest else message)
    params = values.get("params", {})
    return render_template(
        "schedule_form.html", values={**SCHEDULE_DEFAULTS, **values},
        params_text=params if isinstance(params, str) else json.dumps(params, indent=2),
        errors=by_field, kinds=list(enabled_kinds(services().settings)), timezones=sorted(available_timezones()),
    ), status


def parse_schedule_form(form) -> dict:
    """Form strings to the API's schedule body; a bad number or JSON is left for the
    validation to name."""
    body: dict = {name: form.get(name, "").strip() for name in ("name", "cron", "timezone", "kind",
                                                                 "missed_runs", "overlap")}
    for name in ("priority", "max_concurrent"):
        raw = form.get(name, "").strip()
        body[name] = int(raw) if raw.lstrip("-").isdigit() else raw
    raw_params = form.get("params", "").strip() or "{}"
    try:
        body["params"] = limits.loads(raw_params, "params", services().settings.max_json_depth)
    except ValueError as exc:
        body["params"] = raw_params
        raise SpecError(f"params: not JSON ({exc})", {"params": f"must be a JSON object: {exc}"}) from None
    body["enabled"] = "enabled" in form
    return body


@bp.get("/schedules")
def schedules_page():
    with services().sessions() as session:
        rows, total = schedules.list_schedules(session, limit=200, viewer=current_user())
        listed = [schedule_json(s) for s in rows]
    for s in listed:
        s["next_local"], s["last_local"] = _local(s["next_run_at"], s["timezone"]), _local(s["last_run_at"], s["timezone"])
    return render_template("schedules.html", schedules=listed, total=total)


@bp.route("/schedules/new", methods=["GET", "POST"])
def new_schedule():
    svc = services()
    if request.method == "GET":
        values: dict = {}
        if "from" in request.args:  # "schedule this job": its kind, params and priority
            with svc.sessions() as session:
                source = jobs.get_job(session, request.args["from"], current_user())
                values = {"kind": source.kind, "params": source.params, "priority": source.priority,
                          "name": f"{source.kind} every night"}
        return render_schedule_form(values)
    try:
        body = parse_schedule_form(request.form)
        with svc.sessions() as session:
            schedule = schedules.create(session, body, svc.settings, owner=current_user())
            session.commit()
    except SpecError as exc:
        values = {**request.form.to_dict(), "enabled": "enabled" in request.form}
        return render_schedule_form(values, exc.fields or {"name": str(exc)}, status=400)
    return redirect(url_for("pages.schedules_page", _anchor=f"s-{schedule.id}"))


@bp.post("/schedules/<schedule_id>/<action>")
@limiter.shared_limit(submit_limit, scope="submit", exempt_when=lambda: request.view_args.get("action") != "run-now")
def schedule_action(schedule_id: str, action: str):
    """The schedules page's buttons: pause, resume, run-now, delete."""
    svc = services()
    if action == "run-now":
        job = schedules.run_now(svc.sessions, svc.producer, svc.settings, schedule_id, viewer=current_user())
        return redirect(url_for("pages.job_page", job_id=job.id))
    with svc.sessions() as session:
        if action in ("pause", "resume"):
            schedules.update_schedule(session, schedule_id, {"enabled": action == "resume"}, svc.settings,
                                      viewer=current_user())
        elif action == "delete":
            schedules.delete_schedule(session, schedule_id, current_user())
        else:
            return render_template("error.html", code=404, message=f"no schedule action {action!r}"), 404
        session.commit()
    return redirect(url_for("pages.schedules_page"))
