"""Alembic migrations: upgrade from empty, the head check, downgrade, the models match
the migrated schema, and the services refuse an unmigrated database."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from shared.config import Settings
from shared.db import alembic_config, check_migrated, current_revision, head_revision, make_engine, upgrade
from shared.errors import DatabaseNotMigrated
from shared.models import Base
from tests.conftest import fresh_pg_database

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_pg_url():
    """An empty PostgreSQL database of this test's own, dropped afterwards."""
    with fresh_pg_database("diffqueue_mig") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'new' / 'db.sqlite'}"
    return request.getfixturevalue("fresh_pg_url")


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_upgrade_from_empty(empty_url):
    engine = make_engine(empty_url)
    try:
        assert current_revision(engine) is None
        with pytest.raises(DatabaseNotMigrated) as info:
            check_migrated(engine)
        assert "diffqueue db upgrade" in str(info.value)
        assert "none (empty)" in str(info.value)

        upgrade(empty_url)
        assert {"jobs", "artifacts", "alembic_version"} <= tables(engine)
        assert current_revision(engine) == head_revision()
        check_migrated(engine)
        assert schema_diff(engine) == []

        upgrade(empty_url)  # idempotent at head
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(empty_url):
    engine = make_engine(empty_url)
    try:
        upgrade(empty_url)
        command.downgrade(alembic_config(empty_url), "base")
        engine.dispose()
        assert not {"jobs", "artifacts"} & tables(engine)
        assert current_revision(engine) is None
        with pytest.raises(DatabaseNotMigrated):
            check_migrated(engine)
        upgrade(empty_url)
        engine.dispose()
        assert {"jobs", "artifacts"} <= tables(engine)
        assert current_revision(engine) == head_revision()
        check_migrated(engine)
    finally:
        engine.dispose()


def test_head_revision_is_the_single_head():
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert heads == [head_revision()]


def test_models_match_the_migrated_sqlite_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_create_app_refuses_an_unmigrated_database(tmp_path):
    from web import create_app

    settings = Settings.embedded(tmp_path / "data")
    with pytest.raises(DatabaseNotMigrated) as info:
        create_app(settings)
    assert "diffqueue db upgrade" in str(info.value)


def _cli(args: list[str], tmp_path: Path, database_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFQUEUE_DATABASE_URL": database_url, "DIFFQUEUE_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("service", ["web", "worker"])
def test_cli_refuses_to_start_on_an_unmigrated_database(tmp_path, service):
    proc = _cli([service, "--port", "1"] if service == "web" else [service], tmp_path,
                f"sqlite:///{tmp_path / 'empty.db'}")
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr
    assert "diffqueue db upgrade" in proc.stderr


def test_cli_db_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'fresh.db'}"
    proc = _cli(["db", "upgrade"], tmp_path, url)
    assert proc.returncode == 0, proc.stderr
    assert "database at head" in proc.stdout
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        check_migrated(engine)
        assert {"jobs", "artifacts"} <= tables(engine)
    finally:
        engine.dispose()
