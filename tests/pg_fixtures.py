"""A real PostgreSQL 15 cluster for the tests: started once per session on a free loopback port.

The cluster is created with the Debian binaries (``/usr/lib/postgresql/15/bin``) in a
temporary folder owned by the ``postgres`` user (initdb and the server refuse to run as
root, and the tests run as root in CI), with password authentication on loopback, and
stopped at the end of the session. Each test that asks for :func:`pg_url` gets a
database of its own, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PgCluster", "own_pg_cluster", "pg_cluster", "pg_url"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "pg-test-secret-7Qx"


@dataclass(frozen=True)
class PgCluster:
    host: str
    port: int
    user: str
    password: str
    data: Path | None = None
    options: str = ""

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m MODE``: immediate is a crash (backends killed, no shutdown checkpoint)."""
        assert self.data is not None
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"), capture_output=True
        )

    def start(self) -> None:
        """Start it again on the same port (after :meth:`stop`)."""
        assert self.data is not None
        log = str(self.data.parent / "log")
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", self.options, "-w", "start"),
            check=True,
            capture_output=True,
        )

    def url(self, database: str) -> str:
        """A URL without the password (it is given through PGPASSWORD, as users are told to)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


def _start_cluster() -> Iterator[PgCluster]:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; .ci/run installs postgresql)")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no 'postgres' user to run the PostgreSQL server as (the postgresql package creates it)")
    root = Path(tempfile.mkdtemp(prefix="mailer-pg-"))
    data = root / "data"
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    user = "mailer_test"
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(data), "-U", user, "--pwfile", str(pwfile),
            "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8",
        ),
        check=True,
        capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=60"
    cluster = PgCluster("127.0.0.1", port, user, PASSWORD, data=data, options=options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    yield from _start_cluster()


@pytest.fixture(scope="module")
def own_pg_cluster() -> Iterator[PgCluster]:
    """A cluster of the module's own, for tests that stop and restart the server."""
    yield from _start_cluster()


@pytest.fixture
def pg_url(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database on the session's cluster; PGPASSWORD is set for the test."""
    database = "t_" + uuid.uuid4().hex[:12]
    pg_cluster.admin(f"CREATE DATABASE {database}")
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    return pg_cluster.url(database)
