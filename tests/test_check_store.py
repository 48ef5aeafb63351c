"""`mailer check`'s send-log lines (mailer/checks/store.py), through the CLI: SQLite files
and a real PostgreSQL cluster (reachable, unreachable, bad password, missing database,
migrations pending)."""

from __future__ import annotations

import json
import socket
import sqlite3

import psycopg
import pytest
from send_support import Project

from mailer.core.addresses import address_key
from mailer.core.config import LogConfig
from mailer.core.tokens import recipient_tag
from mailer.store import open_store
from mailer.store.migrations import MIGRATIONS, PG_MIGRATIONS, SCHEMA_VERSION


def log_checks(project: Project, **env: str) -> tuple[int, dict[str, dict], str]:
    """(exit code, {name: check} of the 'log' section, all output) of `mailer check --json --no-smtp`."""
    outcome = project.cli("check", "--json", "--no-smtp", env=dict(env))
    found = {c["name"]: c for c in json.loads(outcome.stdout)["checks"] if c["section"] == "log"}
    return outcome.exit_code, found, outcome.stdout + outcome.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- SQLite -------------------------------------------------------------------------


def test_sqlite_not_created_yet_is_ok_and_check_creates_nothing(tmp_path):
    project = Project(tmp_path)
    code, found, _ = log_checks(project)
    assert found["send log"]["status"] == "ok" and "not created yet" in found["send log"]["detail"]
    assert "no send log yet" in found["schema"]["detail"]
    assert code == 0
    assert not project.log_path.exists()


def test_sqlite_current_and_pending_versions(tmp_path):
    project = Project(tmp_path)
    open_store(LogConfig(path=project.log_path)).close()
    code, found, _ = log_checks(project)
    assert code == 0
    assert found["send log"]["detail"] == f"SQLite file {project.log_path}"
    assert found["schema"] == {
        "section": "log",
        "name": "schema",
        "status": "ok",
        "detail": f"{project.log_path}: schema version {SCHEMA_VERSION} (current)",
        "fix": None,
    }
    # A log written by the mailer before: one step behind. check says so and migrates nothing.
    older = tmp_path / "older.sqlite3"
    conn = sqlite3.connect(older, isolation_level=None)
    conn.create_function("mailer_address_key", 1, address_key)  # as migrate() gives the steps
    conn.create_function("mailer_recipient_tag", 1, recipient_tag)
    for step in MIGRATIONS[: SCHEMA_VERSION - 1]:
        for statement in step:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.close()
    project.configure(log={"path": older.name})
    code, found, _ = log_checks(project)
    assert code == 0
    assert found["schema"]["status"] == "warn"
    assert f"schema version {SCHEMA_VERSION - 1}; migrations pending" in found["schema"]["detail"]
    conn = sqlite3.connect(older)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION - 1,)
    conn.close()


def test_sqlite_file_that_is_not_a_send_log_fails(tmp_path):
    project = Project(tmp_path)
    conn = sqlite3.connect(project.log_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    code, found, _ = log_checks(project)
    assert code == 1
    assert found["send log"]["status"] == "fail" and "not a mailer send log" in found["send log"]["detail"]
    (tmp_path / "garbage").write_bytes(b"not sqlite at all " * 100)
    project.configure(log={"path": "garbage"})
    code, found, _ = log_checks(project)
    assert code == 1 and found["send log"]["status"] == "fail"


# --- PostgreSQL ---------------------------------------------------------------------


def test_postgresql_reachable_names_the_server_and_the_schema(tmp_path, pg_url, pg_cluster):
    project = Project(tmp_path, log={"url": pg_url})
    database = pg_url.rsplit("/", 1)[1]
    where = f"{pg_cluster.host}:{pg_cluster.port}/{database}"
    code, found, output = log_checks(project)
    assert code == 0, output
    assert found["send log"]["status"] == "ok"
    assert found["send log"]["detail"].startswith("PostgreSQL 15.") and f"at {where} reachable" in output
    assert found["schema"]["detail"].startswith(f"{where}: no send log yet")
    with psycopg.connect(pg_url) as conn:  # check created nothing
        assert conn.execute("SELECT to_regclass('mailer_schema')").fetchone() == (None,)
    open_store(LogConfig(path=tmp_path / "x", url=pg_url)).close()
    code, found, output = log_checks(project)
    assert code == 0 and found["schema"]["detail"] == f"{where}: schema version {SCHEMA_VERSION} (current)"
    assert pg_cluster.password not in output


def test_postgresql_previous_version_is_pending_and_newer_fails(tmp_path, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mailer_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mailer_schema VALUES (%s)", (SCHEMA_VERSION - 1,))
        for step in PG_MIGRATIONS[: SCHEMA_VERSION - 1]:
            for statement in step:
                conn.execute(statement)
    project = Project(tmp_path, log={"url": pg_url})
    code, found, output = log_checks(project)
    assert code == 0, output
    assert found["schema"]["status"] == "warn" and "migrations pending" in found["schema"]["detail"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM mailer_schema").fetchone() == (SCHEMA_VERSION - 1,)
        conn.execute("UPDATE mailer_schema SET version = %s", (SCHEMA_VERSION + 1,))
    code, found, _ = log_checks(project)
    assert code == 1 and found["schema"]["status"] == "fail" and "newer than this mailer" in found["schema"]["detail"]


def test_postgresql_unreachable_is_a_failed_check(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "unused-secret-Kp2")
    port = _closed_port()
    project = Project(tmp_path, log={"url": f"postgresql://mailer@127.0.0.1:{port}/news"})
    code, found, output = log_checks(project)
    assert code == 1
    assert found["send log"]["status"] == "fail"
    assert f"PostgreSQL at 127.0.0.1:{port}, database 'news'" in found["send log"]["detail"]
    assert "schema" not in found
    assert "unused-secret-Kp2" not in output


@pytest.mark.parametrize("password_env", [None, "MAILER_DB_PASSWORD"])
def test_postgresql_bad_password_is_a_failed_check_without_the_password(
    tmp_path, pg_cluster, monkeypatch, password_env
):
    secret = "Wr0ng-Passw0rd-Qz81"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv(password_env or "PGPASSWORD", secret)
    log = {"url": pg_cluster.url("postgres")} | ({"password_env": password_env} if password_env else {})
    project = Project(tmp_path, log=log)
    project.write_contacts(["ann@example.com"])
    outcome = project.cli("check", str(project.contacts_path), "--no-smtp")
    assert outcome.exit_code == 1, outcome
    assert "password authentication failed" in outcome.stdout
    assert f"{pg_cluster.host}:{pg_cluster.port}" in outcome.stdout
    # The contacts are still checked, but not against a suppression list that cannot be read.
    assert "contacts/suppressed: not checked" in outcome.stdout
    assert secret not in outcome.stdout + outcome.stderr


def test_postgresql_missing_database_is_a_failed_check(tmp_path, pg_cluster, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    project = Project(tmp_path, log={"url": pg_cluster.url("no_such_db_x")})
    code, found, output = log_checks(project)
    assert code == 1
    assert found["send log"]["status"] == "fail"
    assert "'no_such_db_x'" in found["send log"]["detail"] and "does not exist" in found["send log"]["detail"]
    assert "createdb no_such_db_x" in (found["send log"]["fix"] or "")
    assert pg_cluster.password not in output
