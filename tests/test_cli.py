"""The CLI as a user runs it: `diffqueue up`, then submit / wait / status / download."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def cli(*args, env, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_up_submit_wait_download_and_ctrl_c(tmp_path):
    """`diffqueue up` as a user starts it: from a script, so with SIGINT ignored (as a
    shell's background job is), and with a models dir of their own in the environment."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models = tmp_path / "my-models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    env = {**os.environ, "DIFFQUEUE_URL": url, "DIFFQUEUE_TORCH_THREADS": "1", "DIFFQUEUE_MODELS_DIR": str(models)}
    log = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--data-dir",
                           str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 90
        while "diffqueue is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        assert (tmp_path / "data" / "diffqueue.db").exists()
        assert requests.get(url + "/healthz", timeout=5).json()["ok"]

        params = tmp_path / "params.json"
        params.write_text(json.dumps({"max_steps": 8, "num_samples": 2}))
        job_id = cli("submit", "ddpm.train", "--json", str(params), "-p", "sample_steps=3", env=env).stdout.strip()
        assert len(job_id) == 32
        waited = cli("wait", job_id, "--interval", "0.3", "--timeout", "120", env=env)
        assert f"job {job_id} succeeded" in waited.stdout
        status = json.loads(cli("status", job_id, env=env).stdout)
        assert status["params"]["max_steps"] == 8 and status["params"]["sample_steps"] == 3
        assert status["params"]["image_size"] == 16  # filled from the tiny preset

        dest = tmp_path / "dl"
        cli("download", job_id, str(dest), env=env)
        assert (dest / "model" / "model_index.json").is_file()
        assert Image.open(dest / "samples.png").size[0] > 16

        # The environment's models dir, not <data-dir>/models: its model is listed, and a
        # name that is no folder there is refused at submit, naming the field.
        assert [m["ref"] for m in requests.get(url + "/api/v1/models", timeout=5).json()["models"]
                if m["source"] == "local"] == ["mine"]
        assert not (tmp_path / "data" / "models").exists()
        refused = cli("submit", "ddpm.sample", "-p", "model=no-such-model", env=env, check=False)
        assert refused.returncode == 1 and "model: 'no-such-model' is not a folder under" in refused.stderr

        # A failing job (a folder that holds no pipeline): `wait` exits non-zero and prints the error.
        bad = cli("submit", "ddpm.sample", "-p", "model=mine", env=env).stdout.strip()
        failed = cli("wait", bad, "--interval", "0.3", env=env, check=False)
        assert failed.returncode == 1 and f"job {bad} failed: " in failed.stdout and "mine" in failed.stdout

        # Bad params: the CLI shows the field and the bound, exits non-zero.
        refused = cli("submit", "ddpm.train", "-p", "max_steps=0", env=env, check=False)
        assert refused.returncode == 1 and "max_steps" in refused.stderr and "greater than or equal to 1" in refused.stderr
    finally:
        # Ctrl-C stops everything cleanly.
        os.killpg(up.pid, signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "diffqueue: stopping" in (tmp_path / "up.log").read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=2)


def test_token_and_schedule_commands(tmp_path, sqlite_settings):
    from dataclasses import replace

    from tests.conftest import Services

    svc = Services(replace(sqlite_settings, auth_enabled=True), tmp_path)
    try:
        svc.start_web()
        local = {**svc.env, "DIFFQUEUE_TOKEN": ""}
        created = cli("token", "create", "--user", "carol", "--name", "laptop", env=local)
        token = created.stdout.strip()
        assert token.startswith("dq_") and "shown once" in created.stderr and "user carol created" in created.stderr
        assert f"{token[:10]}…" in cli("token", "list", "--user", "carol", env=local).stdout
        assert token not in cli("token", "list", env=local).stdout
        env = {**local, "DIFFQUEUE_URL": svc.url, "DIFFQUEUE_TOKEN": token}
        anonymous = cli("schedule", "list", env={**env, "DIFFQUEUE_TOKEN": ""}, check=False)
        assert anonymous.returncode == 1 and "HTTP 401" in anonymous.stderr

        added = cli("schedule", "add", "ddpm.schedule_plot", "--name", "nightly plot", "--cron", "0 2 * * *",
                    "--tz", "Europe/Berlin", "-p", "num_timesteps_shown=4", "--missed-runs", "catch_up_once",
                    env=env)
        sid = added.stdout.strip()
        assert len(sid) == 32 and "next run 20" in added.stderr
        schedule = svc.api("GET", f"/schedules/{sid}").json()
        assert (schedule["timezone"], schedule["missed_runs"], schedule["params"]["num_timesteps_shown"]) == (
            "Europe/Berlin", "catch_up_once", 4)

        listing = cli("schedule", "list", env=env).stdout
        assert sid in listing and "enabled" in listing and "nightly plot" in listing
        assert "paused" in cli("schedule", "pause", sid, env=env).stdout
        assert svc.api("GET", f"/schedules/{sid}").json()["next_run_at"] is None
        assert "enabled" in cli("schedule", "resume", sid, env=env).stdout
        job_id = cli("schedule", "run-now", sid, env=env).stdout.strip()
        assert svc.api("GET", f"/jobs/{job_id}").json()["schedule_id"] == sid

        # Refused input: the field and the reason, a non-zero exit, nothing saved.
        refused = cli("schedule", "add", "ddpm.schedule_plot", "--name", "x", "--cron", "0 2 * *", env=env, check=False)
        assert refused.returncode == 1 and "cron: must have 5 fields" in refused.stderr
        assert svc.api("GET", f"/schedules/{sid}").json()["owner"] == "carol"  # the admin sees carol's
        cli("schedule", "rm", sid, env=env)
        assert svc.api("GET", "/schedules").json()["total"] == 0

        assert "revoked" in cli("token", "revoke", token[:10], env=local).stdout
        revoked = cli("schedule", "list", env=env, check=False)
        assert revoked.returncode == 1 and "revoked" in revoked.stderr
    finally:
        svc.stop()
