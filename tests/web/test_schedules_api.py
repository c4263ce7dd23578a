"""The schedules API through the Flask test client: create, list, get, patch, delete,
run-now and a schedule's jobs; bad input is a 400 that names the field and saves nothing."""
from __future__ import annotations

import pytest

BODY = {"name": "nightly plot", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "kind": "ddpm.schedule_plot",
        "params": {"num_timesteps_shown": 4}}


def create(client, **fields) -> dict:
    resp = client.post("/api/v1/schedules", json={**BODY, **fields})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def total(client) -> int:
    return client.get("/api/v1/schedules").get_json()["total"]


def test_create_get_list(client):
    s = create(client)
    assert s["params"]["num_timesteps_shown"] == 4 and s["params"]["image_size"] == 64  # defaults filled in
    assert (s["enabled"], s["missed_runs"], s["max_concurrent"], s["overlap"]) == (True, "skip", 1, "skip")
    assert s["next_run_at"].endswith("+00:00")  # stored and shown in UTC
    assert s["next_run_at"][11:16] in ("01:00", "00:00")  # 02:00 in Berlin, CET or CEST
    assert client.get(f"/api/v1/schedules/{s['id']}").get_json() == s
    listing = client.get("/api/v1/schedules").get_json()
    assert listing["total"] == 1 and listing["schedules"][0]["id"] == s["id"]


@pytest.mark.parametrize("fields, field, fragment", [
    ({"cron": "every night"}, "cron", "must have 5 fields"),
    ({"cron": "0 25 * * *"}, "cron", "not a valid cron expression"),
    ({"timezone": "Europe/Atlantis"}, "timezone", "unknown timezone"),
    ({"kind": "nope"}, "kind", "unknown job kind"),
    ({"params": {"image_size": 4}}, "params.image_size", "greater than or equal to 8"),
    ({"params": "x"}, "params", "valid dictionary"),
    ({"priority": 10}, "priority", "less than or equal to 9"),
    ({"overlap": "wait"}, "overlap", "'skip' or 'queue'"),
    ({"name": None}, "name", "valid string"),
])
def test_bad_input_is_a_400_naming_the_field(client, fields, field, fragment):
    resp = client.post("/api/v1/schedules", json={**BODY, **fields})
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["error"] == "invalid_params" and fragment in body["fields"][field], body
    assert total(client) == 0


def test_a_non_object_body_is_a_400(client):
    resp = client.post("/api/v1/schedules", data="[]", content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["fields"] == {"body": "must be a JSON object"}


def test_patch_pauses_resumes_and_validates_the_whole(client):
    s = create(client)
    paused = client.patch(f"/api/v1/schedules/{s['id']}", json={"enabled": False}).get_json()
    assert paused["enabled"] is False and paused["next_run_at"] is None
    resumed = client.patch(f"/api/v1/schedules/{s['id']}", json={"enabled": True}).get_json()
    assert resumed["next_run_at"] is not None

    resp = client.patch(f"/api/v1/schedules/{s['id']}", json={"cron": "* * * *", "name": "x"})
    assert resp.status_code == 400 and "cron" in resp.get_json()["fields"]
    assert client.get(f"/api/v1/schedules/{s['id']}").get_json()["name"] == "nightly plot"  # nothing applied
    resp = client.patch(f"/api/v1/schedules/{s['id']}", json={"colour": "red"})
    assert resp.status_code == 400 and resp.get_json()["fields"] == {"colour": "unknown field"}

    changed = client.patch(f"/api/v1/schedules/{s['id']}", json={"params": {"image_size": 32}}).get_json()
    assert changed["params"]["image_size"] == 32 and changed["params"]["num_timesteps_shown"] == 8  # replaced whole


def test_run_now_and_the_schedules_jobs(client):
    s = create(client, enabled=False)
    resp = client.post(f"/api/v1/schedules/{s['id']}/run-now")
    assert resp.status_code == 202
    job = resp.get_json()
    assert (job["schedule_id"], job["kind"], job["status"]) == (s["id"], "ddpm.schedule_plot", "queued")
    assert job["scheduled_for"] is not None
    listed = client.get(f"/api/v1/schedules/{s['id']}/jobs").get_json()
    assert listed["total"] == 1 and listed["jobs"][0]["id"] == job["id"]
    assert client.get(f"/api/v1/schedules/{s['id']}").get_json()["last_job_id"] == job["id"]


def test_delete_keeps_the_jobs_and_unknown_ids_are_404(client):
    s = create(client)
    job = client.post(f"/api/v1/schedules/{s['id']}/run-now").get_json()
    assert client.delete(f"/api/v1/schedules/{s['id']}").status_code == 204
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["schedule_id"] is None
    for method, path in [("get", ""), ("patch", ""), ("delete", ""), ("post", "/run-now"), ("get", "/jobs")]:
        resp = getattr(client, method)(f"/api/v1/schedules/{s['id']}{path}", json={})
        assert resp.status_code == 404 and resp.get_json()["error"] == "not_found", (method, path)


def test_upload_references_in_the_template_are_checked(client):
    resp = client.post("/api/v1/schedules", json={**BODY, "params": {"image": "upload:" + "c" * 32}})
    assert resp.status_code == 400 and "not found" in resp.get_json()["fields"]["params.image"]
    assert total(client) == 0
