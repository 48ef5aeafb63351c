"""`mailer check`'s send-log lines: where the log is, whether it can be reached, its schema version.

These lines only read: they never create a send log nor migrate one (the next
``mailer send`` does), so it can be run against a production database at any time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from ..core.config import LogConfig
from ..core.errors import SendLogError
from ..store.migrations import APPLICATION_ID, SCHEMA_VERSION
from .run import Check

__all__ = ["check_send_log"]


def _version_check(where: str, version: int | None) -> Check:
    """The schema line of a store that could be read: current, migrations pending, or too new."""
    if version is None:
        return Check(
            "log",
            "schema",
            "ok",
            f"{where}: no send log yet; the first `mailer send` creates it (schema version {SCHEMA_VERSION})",
        )
    if version > SCHEMA_VERSION:
        return Check(
            "log",
            "schema",
            "fail",
            f"{where}: schema version {version}, newer than this mailer knows ({SCHEMA_VERSION})",
            "A newer mailer wrote it: upgrade mailer on this host, or point [log] at another send log.",
        )
    if version < SCHEMA_VERSION:
        return Check(
            "log",
            "schema",
            "warn",
            f"{where}: schema version {version}; migrations pending (this mailer's is {SCHEMA_VERSION})",
            "The next `mailer send` migrates it forward; every host sharing it needs this mailer version then.",
        )
    return Check("log", "schema", "ok", f"{where}: schema version {version} (current)")


def _check_sqlite(path: Path) -> Iterator[Check]:
    where = str(path)
    if not path.exists():
        if not path.parent.is_dir():
            yield Check(
                "log",
                "send log",
                "fail",
                f"{where}: the folder {str(path.parent)!r} does not exist",
                "Create it, or change [log] path in mailer.toml.",
            )
            return
        yield Check("log", "send log", "ok", f"SQLite file {where} (not created yet)")
        yield _version_check(where, None)
        return
    if path.is_dir() or path.stat().st_size == 0:
        yield Check(
            "log",
            "send log",
            "fail",
            f"{where}: " + ("a folder, not a send log file" if path.is_dir() else "an empty file, not a send log"),
            "Point [log] path at the send log file of the earlier runs.",
        )
        return
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            application_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        yield Check("log", "send log", "fail", f"{where}: cannot be read ({exc})", "Check the file and its rights.")
        return
    if application_id not in (0, APPLICATION_ID) or version == 0:
        yield Check(
            "log",
            "send log",
            "fail",
            f"{where}: a SQLite database, but not a mailer send log",
            "Point [log] path in mailer.toml at a file of its own.",
        )
        return
    yield Check("log", "send log", "ok", f"SQLite file {where}")
    yield _version_check(where, version)


def _check_postgres(log: LogConfig) -> Iterator[Check]:
    import psycopg

    from ..store.postgres import connect, read_schema_version

    try:
        conn, target = connect(log)
    except SendLogError as exc:
        yield Check("log", "send log", "fail", exc.message, exc.hint)
        return
    where = f"{target.host}:{target.port}/{target.database}"
    try:
        with conn:
            server = conn.info.server_version
            version = read_schema_version(conn)
    except psycopg.Error as exc:
        yield Check("log", "send log", "fail", f"{where}: connected, then the query failed ({type(exc).__name__})")
        return
    yield Check("log", "send log", "ok", f"PostgreSQL {server // 10000}.{server % 10000} at {where} reachable")
    yield _version_check(where, version)


def check_send_log(log: LogConfig) -> Iterator[Check]:
    """The send log of ``[log]``: SQLite at ``path`` or PostgreSQL at ``url`` (no password shown)."""
    if log.url is not None:
        yield from _check_postgres(log)
    else:
        yield from _check_sqlite(Path(log.path))
