"""The JSON API under /api/v1. Views are flat: read, validate, act, respond."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from flask import Blueprint, Response, g, jsonify, redirect, request, url_for
from sqlalchemy import select, text

from shared import auth, idempotency, jobs, model_catalog, schedules, uploads, webhooks
from shared.errors import JobNotFound, SpecError
from shared.retention import expires_at, set_pinned
from shared.models import Artifact, Job, JobStatus, Schedule, Upload
from shared.specs import KINDS, kinds_schema
from shared.storage import file_digest, job_key, zip_stream
from web import reads, services
from web.auth import current_user, limiter, submit_limited
from web.errors import error_response
from web.limits import MULTIPART_SLACK, json_body

bp = Blueprint("api", __name__, url_prefix="/api/v1")
log = logging.getLogger(__name__)

MAX_PAGE = 200
STATUSES = [s.value for s in JobStatus]


def public_url(endpoint: str, **values) -> str:
    """`endpoint`'s URL on DIFFQUEUE_PUBLIC_URL, or its path alone when that is unset;
    never on the request's Host header, which the client writes."""
    return services().settings.public_url + url_for(endpoint, **values)


def artifact_json(a: Artifact) -> dict:
    return {
        "name": a.name,
        "kind": a.kind,
        "content_type": a.content_type,
        "size": a.size,
        "sha256": a.sha256,
        "meta": a.meta,
        "url": public_url("api.artifact", job_id=a.job_id, name=a.name),
    }


def _iso(value):
    return value.isoformat() if value else None


def job_json(job: Job, with_artifacts: bool = True) -> dict:
    body = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "priority": job.priority,
        "queue": job.queue,
        "params": job.params,
        "progress": {
            "step": job.progress_step,
            "total": job.progress_total,
            "message": job.progress_message,
            "eta_s": jobs.eta_seconds(job),
        },
        "attempt": job.attempt,
        "worker": job.worker,
        "cancel_requested": job.cancel_requested,
        "pinned": job.pinned,
        # When retention deletes it (null: pinned, unfinished, or retention off).
        "expires_at": _iso(expires_at(job, services().settings.retention_days)),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
        "error": job.error,
        "traceback": job.traceback,
        "result": job.result,
        "schedule_id": job.schedule_id,
        "scheduled_for": _iso(job.scheduled_for),
        "webhook": webhooks.public_json(job),
        "owner": job.owner.name if job.owner else None,
        "url": public_url("api.get_job", job_id=job.id),
    }
    if with_artifacts:
        body["artifacts"] = [artifact_json(a) for a in job.artifacts]
        # The newest progress preview (x beside the predicted x0). Artifacts come sorted by
        # name, and previews/step-NNNN.png names sort in step order.
        previews = [a for a in job.artifacts if a.name.startswith("previews/")]
        previews = previews or [a for a in job.artifacts if a.name == "preview.png"]
        body["progress"]["preview"] = (
            {"name": previews[-1].name, "url": artifact_json(previews[-1])["url"]} if previews else None
        )
    return body


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SpecError(f"{name} must be an integer, got {raw!r}", {name: "must be an integer"}) from None
    if not lo <= value <= hi:
        raise SpecError(f"{name} must be in [{lo}, {hi}], got {value}", {name: f"must be in [{lo}, {hi}]"})
    return value


def _page() -> tuple[int, int]:
    """`?limit=&offset=` of a list endpoint, bounded."""
    return _int_arg("limit", 50, 1, MAX_PAGE), _int_arg("offset", 0, 0, 10**9)


def _accepted(body: dict, status: int, location: str, replayed: bool = False):
    """A 201/202 with the new resource and its Location; `replayed`: the resource an
    earlier request with the same Idempotency-Key made."""
    resp = jsonify(body)
    resp.status_code = status
    resp.headers["Location"] = location
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _listing(key: str, items: list[dict], total: int, limit: int, offset: int):
    return jsonify({key: items, "total": total, "limit": limit, "offset": offset})


@bp.post("/jobs")
@submit_limited
def create_job():
    body = json_body(bare="params")
    unknown = sorted(set(body) - {"kind", "params", "priority", *webhooks.FIELDS})
    if unknown:
        raise SpecError(f"unknown top-level fields: {', '.join(unknown)}", {k: "unknown field" for k in unknown})
    svc = services()
    claim = idempotency.claim(request.headers.get(idempotency.HEADER), current_user(), "jobs",
                              json.dumps(body, sort_keys=True).encode())
    job_id, replayed = idempotency.once(svc.sessions, claim, lambda: jobs.submit(
        svc.sessions, svc.producer, svc.settings, body.get("kind"), body.get("params", {}), body.get("priority", 0),
        owner=current_user(), webhook=body, idempotency_claim=claim).id)
    with svc.sessions() as session:
        job = jobs.get_job(session, job_id)
        return _accepted(job_json(job), 202, url_for("api.get_job", job_id=job.id), replayed)


@bp.get("/jobs")
def list_jobs():
    status, kind = request.args.get("status"), request.args.get("kind")
    if status and status not in STATUSES:
        reason = f"must be one of {', '.join(STATUSES)}, got {status!r}"
        raise SpecError(f"status {reason}", {"status": reason})
    if kind and kind not in KINDS:
        reason = f"must be one of {', '.join(sorted(KINDS))}, got {kind!r}"
        raise SpecError(f"kind {reason}", {"kind": reason})
    limit, offset = _page()
    with services().sessions() as session:
        rows, total = jobs.list_jobs(session, status, kind, limit, offset, viewer=current_user())
        return _listing("jobs", [job_json(j, with_artifacts=False) for j in rows], total, limit, offset)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    """The endpoint clients poll: the job's JSON is kept between requests (web/cache.py)
    until the job or its artifacts change; the visibility check and the ETA are of now."""
    # What the rate-limit check found kept, if it did: answered as it was not counted.
    entry = g.pop("kept_job", None) or services().cache.get(*_job_cache_key(job_id), lambda: _job_entry(job_id))
    if entry is None or not auth.can_see(entry[0], current_user()):
        raise JobNotFound(f"no job with id {job_id!r}")
    _owner_id, body, eta_inputs = entry
    return jsonify({**body, "progress": {**body["progress"], "eta_s": jobs.eta(*eta_inputs)}})


def _job_cache_key(job_id: str) -> tuple[str, None]:
    return "job:" + job_id, None  # one JSON a job: its URLs are the same for every request


@limiter.request_filter
def _poll_answered_from_cache() -> bool:
    """A poll of a job this process keeps, unchanged since it last read it, is not
    counted against the rate limits: it reaches neither the database nor the queue,
    which the limits protect, and counting it in Redis would cost more than answering
    it (bench/queue.py). Everything else is counted. What is found is what the view
    answers, so a change arriving in between cannot make an uncounted read."""
    if request.endpoint != "api.get_job" or request.method != "GET":
        return False
    g.kept_job = services().cache.peek(*_job_cache_key(request.view_args["job_id"]))
    return g.kept_job is not None


def _job_entry(job_id: str) -> tuple | None:
    try:
        job = jobs.get_job(reads(), job_id, artifacts=True)
    except JobNotFound:
        return None
    return job.owner_id, job_json(job), jobs.eta_inputs(job)


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    with services().sessions() as session:
        jobs.get_job(session, job_id, current_user())
        job = jobs.cancel(session, job_id)
        session.commit()
        return jsonify(job_json(job)), 202


@bp.post("/jobs/<job_id>/retry")
@submit_limited
def retry_job(job_id: str):
    svc = services()
    jobs.retry_and_publish(svc.sessions, svc.producer, svc.settings, job_id, current_user())
    with svc.sessions() as session:
        return jsonify(job_json(jobs.get_job(session, job_id))), 202


@bp.post("/jobs/<job_id>/pin", endpoint="pin_job", defaults={"pinned": True})
@bp.post("/jobs/<job_id>/unpin", endpoint="unpin_job", defaults={"pinned": False})
def pin_job(job_id: str, pinned: bool):
    """Pin a job (retention never deletes it), or unpin it."""
    with services().sessions() as session:
        job = set_pinned(session, job_id, pinned, current_user())
        session.commit()
        return jsonify(job_json(job))


@bp.get("/jobs/<job_id>/webhooks")
def list_webhook_deliveries(job_id: str):
    """The job's webhook delivery log, oldest first."""
    with services().sessions() as session:
        jobs.get_job(session, job_id, current_user())
        return jsonify({"deliveries": [webhooks.delivery_json(d) for d in webhooks.list_deliveries(session, job_id)]})


def _artifact(session, job_id: str, name: str) -> Artifact:
    jobs.get_job(session, job_id, current_user())
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        raise JobNotFound(f"job {job_id} has no artifact {name!r}")
    return artifact


@bp.get("/jobs/<job_id>/artifacts/<path:name>")
def artifact(job_id: str, name: str):
    svc = services()
    with svc.sessions() as session:
        a = _artifact(session, job_id, name)
    key = job_key(job_id, a.name)
    url = svc.storage.presigned_url(key)
    if url:
        return redirect(url, code=302)
    resp = Response(svc.storage.open_stream(key), mimetype=a.content_type)
    resp.headers["Content-Length"] = str(a.size)
    resp.headers["ETag"] = a.sha256
    return resp


@bp.get("/jobs/<job_id>/archive")
def archive(job_id: str):
    """A zip of the job's artifacts under `?prefix=` (e.g. `model/`), or all of them."""
    prefix = request.args.get("prefix", "")
    svc = services()
    with svc.sessions() as session:
        job = jobs.get_job(session, job_id, current_user())
        members = [(job_key(job_id, a.name), a.name, a.size) for a in job.artifacts if a.name.startswith(prefix)]
    if not members:
        return error_response(404, "not_found", f"job {job_id} has no artifacts under {prefix!r}")
    stem = prefix.strip("/").replace("/", "-") or "artifacts"
    # Written as it is sent, a storage chunk at a time: a model's gigabytes never sit in
    # this process. So there is no Content-Length (the size is known only at the end).
    return Response(
        zip_stream(svc.storage, members),
        mimetype="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-{stem}.zip"'},
    )


def upload_json(u: Upload) -> dict:
    return {
        "id": u.id,
        "ref": uploads.upload_ref(u.id),
        "filename": u.filename,
        "kind": u.kind,
        "content_type": u.content_type,
        "size": u.size,
        "sha256": u.sha256,
        "meta": u.meta,
        "created_at": _iso(u.created_at),
        "owner": u.owner.name if u.owner else None,
        "url": public_url("api.get_upload", upload_id=u.id),
    }


@bp.post("/uploads")
@submit_limited
def create_upload():
    """multipart/form-data with the file in `file`: a dataset zip, an image or a prompts file."""
    svc = services()
    limit = svc.settings.upload_max_bytes
    if (request.content_length or 0) > limit + MULTIPART_SLACK:
        raise uploads.upload_too_large(
            f"upload is {uploads.human_bytes(request.content_length)}, "
            f"above the {uploads.human_bytes(limit)} upload limit"
        )
    file = request.files.get("file")
    if file is None or not file.filename:
        raise SpecError("file is required: send multipart/form-data with the file in a 'file' field",
                        {"file": "required"})
    with tempfile.TemporaryDirectory(prefix="diffqueue-upload-") as tmp:
        path = Path(tmp) / "upload"
        uploads.copy_capped(file.stream, path, limit)
        key = request.headers.get(idempotency.HEADER)
        claim = None if key is None else idempotency.claim(key, current_user(), "uploads",
                                                           f"{file.filename}\n{file_digest(path)[1]}".encode())
        upload_id, replayed = idempotency.once(svc.sessions, claim, lambda: uploads.save_upload(
            svc.sessions, svc.storage, svc.settings, file.filename, path, owner_id=auth.owner_id_of(current_user()),
            idempotency_claim=claim).id)
    with svc.sessions() as session:
        upload = uploads.get_upload(session, upload_id)
        return _accepted(upload_json(upload), 201, url_for("api.get_upload", upload_id=upload.id), replayed)


@bp.get("/uploads")
def list_uploads():
    kind = request.args.get("kind")
    if kind and kind not in uploads.UPLOAD_KINDS:
        reason = f"must be one of {', '.join(uploads.UPLOAD_KINDS)}, got {kind!r}"
        raise SpecError(f"kind {reason}", {"kind": reason})
    limit, offset = _page()
    with services().sessions() as session:
        rows, total = uploads.list_uploads(session, kind, limit, offset, viewer=current_user())
        return _listing("uploads", [upload_json(u) for u in rows], total, limit, offset)


@bp.get("/uploads/<upload_id>")
def get_upload(upload_id: str):
    with services().sessions() as session:
        return jsonify(upload_json(uploads.get_upload(session, upload_id, current_user())))


def schedule_json(s: Schedule) -> dict:
    return {
        "id": s.id,
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "kind": s.kind,
        "params": s.params,
        "priority": s.priority,
        "enabled": s.enabled,
        "missed_runs": s.missed_runs,
        "max_concurrent": s.max_concurrent,
        "overlap": s.overlap,
        "webhook": webhooks.public_json(s),
        "next_run_at": _iso(s.next_run_at),
        "held_since": _iso(s.held_since),
        "last_run_at": _iso(s.last_run_at),
        "last_job_id": s.last_job_id,
        "skipped_runs": s.skipped_runs,
        "last_skip_reason": s.last_skip_reason,
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
        "owner": s.owner.name if s.owner else None,
        "url": public_url("api.get_schedule", schedule_id=s.id),
    }


@bp.post("/schedules")
def create_schedule():
    svc = services()
    with svc.sessions() as session:
        schedule = schedules.create(session, json_body(), svc.settings, owner=current_user())
        session.commit()
        return _accepted(schedule_json(schedule), 201, url_for("api.get_schedule", schedule_id=schedule.id))


@bp.get("/schedules")
def list_schedules():
    limit, offset = _page()
    with services().sessions() as session:
        rows, total = schedules.list_schedules(session, limit, offset, viewer=current_user())
        return _listing("schedules", [schedule_json(s) for s in rows], total, limit, offset)


@bp.get("/schedules/<schedule_id>")
def get_schedule(schedule_id: str):
    with services().sessions() as session:
        return jsonify(schedule_json(schedules.get_schedule(session, schedule_id, current_user())))


@bp.patch("/schedules/<schedule_id>")
def update_schedule(schedule_id: str):
    svc = services()
    with svc.sessions() as session:
        schedule = schedules.update_schedule(session, schedule_id, json_body(), svc.settings, viewer=current_user())
        session.commit()
        return jsonify(schedule_json(schedule))


@bp.delete("/schedules/<schedule_id>")
def delete_schedule(schedule_id: str):
    with services().sessions() as session:
        schedules.delete_schedule(session, schedule_id, current_user())
        session.commit()
    return "", 204


@bp.post("/schedules/<schedule_id>/run-now")
@submit_limited
def run_schedule_now(schedule_id: str):
    svc = services()
    job = schedules.run_now(svc.sessions, svc.producer, svc.settings, schedule_id, viewer=current_user())
    with svc.sessions() as session:
        return _accepted(job_json(jobs.get_job(session, job.id)), 202, url_for("api.get_job", job_id=job.id))


@bp.get("/schedules/<schedule_id>/jobs")
def list_schedule_jobs(schedule_id: str):
    limit, offset = _page()
    with services().sessions() as session:
        rows, total = schedules.schedule_jobs(session, schedule_id, limit, offset, viewer=current_user())
        return _listing("jobs", [job_json(j, with_artifacts=False) for j in rows], total, limit, offset)


@bp.get("/kinds")
def list_kinds():
    return jsonify({"kinds": kinds_schema(services().settings)})


@bp.get("/models")
def list_models():
    """What a job's `model` can name without a download: folders under the models dir,
    then the newest succeeded ddpm.train jobs' models."""
    svc = services()
    local = model_catalog.list_local_models(svc.settings.models_dir)
    with svc.sessions() as session:
        from_jobs = model_catalog.list_job_models(session, viewer=current_user())
    return jsonify({"models": local + from_jobs})


@bp.get("/healthz", endpoint="healthz_v1")
def healthz_v1():
    return healthz()


def healthz():
    svc = services()
    checks: dict[str, dict] = {}

    def probe(name: str, fn) -> None:
        try:
            fn()
            checks[name] = {"ok": True}
        except Exception as exc:  # reported, not raised: this endpoint's job is to tell
            # Public: which component is down, never where (host, port, path) or the exception's
            # text; the log has the detail.
            log.warning("healthz: %s check failed: %s: %s", name, type(exc).__name__, exc)
            checks[name] = {"ok": False, "error": getattr(exc, "public_reason", "unavailable")}

    def db():
        with svc.sessions() as session:
            session.execute(text("SELECT 1"))

    def broker():
        with svc.producer.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    probe("database", db)
    probe("broker", broker)
    probe("storage", svc.storage.check)
    ok = all(c["ok"] for c in checks.values())
    return jsonify({"ok": ok, "checks": checks}), 200 if ok else 503
