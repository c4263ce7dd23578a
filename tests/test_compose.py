"""Static checks of the production docker-compose.yml (no Docker engine needed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
EXPECTED_SERVICES = {"postgres", "redis", "minio", "createbuckets", "migrate", "web", "worker", "beat"}


def test_compose_config_validates():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not on PATH")
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr or proc.stdout


def _load_compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_has_all_services():
    services = _load_compose()["services"]
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"missing services: {sorted(missing)}"


def test_worker_reserves_an_nvidia_gpu():
    worker = _load_compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
    ), devices


def test_beat_runs_diffqueue_beat_once_the_database_is_migrated():
    beat = _load_compose()["services"]["beat"]
    assert beat["command"] == ["diffqueue", "beat"]
    assert beat["deploy"]["replicas"] == 1
    assert beat["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert beat["environment"]["DIFFQUEUE_DATABASE_URL"].startswith("postgresql")


def test_auth_is_on_and_rate_limits_count_in_redis():
    env = _load_compose()["x-diffqueue-env"]
    assert env["DIFFQUEUE_AUTH"] == "on"
    assert env["DIFFQUEUE_RATELIMIT_STORAGE_URL"].startswith("redis://redis:6379/")
