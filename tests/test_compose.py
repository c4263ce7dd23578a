"""Static checks of the production docker-compose.yml (no Docker engine needed)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
EXPECTED_SERVICES = {"postgres", "redis", "minio", "createbuckets", "migrate", "web", "worker", "beat", "proxy"}
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# What a filled-in .env holds (.env.example lists these, empty).
SECRETS = {
    "DIFFQUEUE_SECRET_KEY": "5f0c" * 16,
    "POSTGRES_PASSWORD": "9a1e" * 8,
    "MINIO_ROOT_USER": "diffqueue-admin",
    "MINIO_ROOT_PASSWORD": "3b7d" * 8,
}


def compose_config(tmp_path: Path, secrets: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker-compose config` with `secrets` in the environment and an empty env file, so
    that a developer's own .env (or variables in this shell) cannot stand in for them."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not on PATH")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "DIFFQUEUE_SECURE_COOKIES"}
    return subprocess.run([exe, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"], cwd=ROOT,
                          env={**env, **secrets}, capture_output=True, text=True, timeout=60)


def test_compose_config_validates(tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    proc = compose_config(tmp_path, SECRETS)
    assert proc.returncode == 0, proc.stderr or proc.stdout
    services = yaml.safe_load(proc.stdout)["services"]
    # Each secret reaches every place that needs it.
    for name in ("migrate", "web", "worker", "beat"):
        env = services[name]["environment"]
        assert env["DIFFQUEUE_SECRET_KEY"] == SECRETS["DIFFQUEUE_SECRET_KEY"], name
        assert f"diffqueue:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/" in env["DIFFQUEUE_DATABASE_URL"], name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            SECRETS["MINIO_ROOT_USER"], SECRETS["MINIO_ROOT_PASSWORD"]), name
        assert env["DIFFQUEUE_SECURE_COOKIES"] == "on", name  # behind HTTPS, as deployed
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    for name in ("minio", "createbuckets"):
        env = services[name]["environment"]
        assert (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"]) == (
            SECRETS["MINIO_ROOT_USER"], SECRETS["MINIO_ROOT_PASSWORD"]), name


@pytest.mark.parametrize("missing", sorted(SECRETS))
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_compose_refuses_to_start_without_each_secret(tmp_path, missing, how):
    secrets = {k: v for k, v in SECRETS.items() if k != missing}
    if how == "empty":  # as left in a copy of .env.example
        secrets[missing] = ""
    proc = compose_config(tmp_path, secrets)
    assert proc.returncode != 0
    assert f"set {missing} in .env (see .env.example)" in proc.stderr, proc.stderr


def test_env_example_lists_every_secret_empty_and_none_has_a_default():
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required == set(SECRETS)
    # `${VAR:-default}` for a secret would start a stack with a well-known password.
    defaulted = set(re.findall(r"\$\{(\w+):?-", COMPOSE_FILE.read_text()))
    assert not defaulted & required, defaulted & required
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert dict(line.split("=", 1) for line in lines) == {name: "" for name in required}
    assert 'python -c "import secrets; print(secrets.token_hex(32))"' in ENV_EXAMPLE.read_text()


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


def test_worker_and_beat_have_healthchecks_on_their_liveness_files():
    services = _load_compose()["services"]
    for name in ("worker", "beat"):
        service = services[name]
        path = service["environment"]["DIFFQUEUE_LIVENESS_FILE"]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "diffqueue", "alive"] and test[3] == path, name


def test_every_service_that_checks_a_model_name_sees_the_models_and_the_hub_is_not_open():
    from fnmatch import fnmatchcase

    from shared.specs import DEFAULT_SD_MODEL

    services = _load_compose()["services"]
    for name in ("web", "worker", "beat"):  # the submit, the run, a schedule's occurrence
        assert "./models:/models:ro" in services[name]["volumes"], name
    allow = _load_compose()["x-diffqueue-env"]["DIFFQUEUE_HUB_MODELS_ALLOW"]
    patterns = re.search(r":-(.*)}$", allow).group(1).split(",")
    assert "*" not in patterns
    assert any(fnmatchcase(DEFAULT_SD_MODEL, p) for p in patterns)


# ------------------------------------------------------------------ the proxy in front of the web
def test_only_the_proxy_publishes_the_web(tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    proc = compose_config(tmp_path, SECRETS)
    assert proc.returncode == 0, proc.stderr or proc.stdout
    services = yaml.safe_load(proc.stdout)["services"]
    for name in ("migrate", "web", "worker", "beat"):
        assert not services[name].get("ports"), f"{name} publishes {services[name]['ports']}"
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert [str(p.get("published")) if isinstance(p, dict) else p.split(":")[0] for p in proxy["ports"]] == ["8000"]
    mounts = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in proxy["volumes"]]
    assert str(NGINX_CONF) in mounts, mounts
    assert proxy["depends_on"]["web"]["condition"] == "service_healthy"
    # The web trusts exactly that one hop, and builds its URLs on the proxy's address.
    web = services["web"]["environment"]
    assert web["DIFFQUEUE_PROXY_HOPS"] == "1"
    assert web["DIFFQUEUE_PUBLIC_URL"] == "http://localhost:8000"
    assert "DIFFQUEUE_PROXY_HOPS" not in services["worker"]["environment"]


def _nginx_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in NGINX_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip().rstrip(";")
        if line and not line.endswith(("{", "}")):
            name, _, value = line.partition(" ")
            directives.setdefault(name, []).append(value.strip())
    return directives


def test_nginx_bounds_slow_clients_buffers_bodies_and_forwards_the_client():
    from shared.config import Settings
    from web.limits import MULTIPART_SLACK

    d = _nginx_directives()
    for timeout in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        assert d.get(timeout), f"{timeout} is not set"
    assert d["proxy_request_buffering"] == ["on"]
    size = d["client_max_body_size"][0]
    assert size.endswith("m")
    upload_limit = Settings.embedded(Path("/nonexistent")).upload_max_bytes
    # Room for the largest upload the web takes, and not a great deal more.
    assert upload_limit + MULTIPART_SLACK <= int(size[:-1]) * 1024**2 <= upload_limit + 16 * 1024**2
    headers = dict(v.split(" ", 1) for v in d["proxy_set_header"])
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert headers["X-Forwarded-Host"] == "$http_host"


def test_nginx_accepts_the_config(tmp_path):
    """`nginx -t` on deploy/nginx.conf inside a minimal main config, as the official
    image includes it (needs an nginx on PATH: Debian's `nginx-light` will do)."""
    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if exe is None:
        pytest.skip("nginx is not installed")
    main = tmp_path / "nginx.conf"
    temps = " ".join(f"{kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    main.write_text(f"pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'error.log'};\n"
                    f"events {{}}\nhttp {{ access_log off; {temps} include {NGINX_CONF}; }}\n")
    proc = subprocess.run([exe, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
