"""The send log in PostgreSQL: real sends, report and suppress through the CLI against a
real PostgreSQL 15 cluster (tests/pg_fixtures.py), connection errors, migrations, locks."""

from __future__ import annotations

import psycopg
import pytest
from send_support import Project, addresses, received_addresses
from store_support import mark_sending, record_result

from mailer.core.config import LogConfig
from mailer.core.errors import LockedError, SendLogError, StoreUnavailableError
from mailer.core.outcomes import Status
from mailer.store import open_store
from mailer.store.migrations import SCHEMA_VERSION


def pg_project(tmp_path, server, url: str) -> Project:
    return Project(tmp_path, server, log={"url": url})


def test_send_report_and_resume_against_postgresql(smtp_server, tmp_path, pg_url):
    project = pg_project(tmp_path, smtp_server, pg_url)
    emails = addresses(30)
    project.write_contacts(emails)
    assert project.cli("suppress", "add", emails[3]).exit_code == 0
    first = project.send("--yes")
    assert first.exit_code == 0, first
    got = received_addresses(smtp_server)
    assert sorted(got) == sorted(e for e in emails if e != emails[3])
    assert not (tmp_path / "mailer.sqlite3").exists()  # nothing went to SQLite
    report = project.report("--campaign", "news")
    assert report["by_status"]["sent"] == 29 and report["by_status"]["suppressed"] == 1
    # A second run of the campaign resumes: nobody is mailed again.
    again = project.send("--yes")
    assert again.exit_code == 0, again
    assert len(received_addresses(smtp_server)) == 29
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries WHERE status = 'sent'").fetchone() == (29,)
        assert conn.execute("SELECT version FROM mailer_schema").fetchone() == (SCHEMA_VERSION,)


def test_suppress_commands_against_postgresql(tmp_path, pg_url):
    project = pg_project(tmp_path, None, pg_url)
    assert project.cli("suppress", "add", "Ann@Example.com", "bob@example.com").exit_code == 0
    listed = project.cli("suppress", "list")
    assert listed.exit_code == 0, listed
    assert "ann@example.com" in listed.stdout and "bob@example.com" in listed.stdout
    assert project.cli("suppress", "remove", "ANN@example.com").exit_code == 0
    assert "ann@example.com" not in project.cli("suppress", "list").stdout


def test_store_guarantees_match_sqlite(pg_url, tmp_path):
    config = LogConfig(path=tmp_path / "x", url=pg_url)
    with open_store(config) as store:
        mark_sending(store, "c", "Ann@x.org", message_id="<1@x>")
        assert store.statuses("c", ["ann@x.org", "nobody@x.org"]) == [Status.SENDING, None]
        record_result(store, "c", "ann@x.org", status="sent", smtp_code=250, smtp_reply="250 ok")
        store.record_events(
            "c",
            [
                ("b@x.org", Status.SENDING, None, None, "<2@x>", 2),
                ("b@x.org", Status.FAILED, 550, "550 no", None, None),
            ],
            bounces=[("b@x.org", "550 no")],
        )
        assert store.statuses("c", ["b@x.org"]) == [Status.FAILED]
        assert store.suppressed(["B@X.org", "ann@x.org"]) == [True, False]
        mark_sending(store, "c", "lost@x.org", message_id="<3@x>")
        report = store.report("c")
        assert [row.recipient for row in report.unknown_outcome] == ["lost@x.org"]
        assert report.by_status["sent"] == 1 and report.by_status["failed"] == 1
        run = store.start_run("c", template=None, contacts=None)
        store.record_events("c", [], journal=(run, 123))
        assert store.journal_applied(run) == 123
        assert store.add_suppressions(["z@x.org", "Z@x.org"]) == (1, 1)
        assert store.find_by_message_ids(["1@x", " <1@x> ", "<none@x>"]) == {
            "1@x": ("c", "ann@x.org"),
            " <1@x> ": ("c", "ann@x.org"),  # the address as last written
        }


def test_second_run_of_a_campaign_is_refused_across_machines(pg_url, tmp_path):
    first = open_store(LogConfig(path=tmp_path / "a" / "log", url=pg_url))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    second = open_store(LogConfig(path=tmp_path / "b" / "log", url=pg_url))  # another folder: another machine
    with first, second:
        lock = first.acquire_lock("news")
        with pytest.raises(LockedError) as caught:
            second.acquire_lock("news")
        assert caught.value.exit_code == 75
        lock.release()
        second.acquire_lock("news").release()


def test_unreachable_database_is_exit_2_naming_host_port_database(smtp_server, tmp_path, pg_cluster, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "wrong-secret-Zq9")
    project = pg_project(tmp_path, smtp_server, pg_cluster.url("postgres"))
    project.write_contacts(addresses(3))
    outcome = project.send("--yes")
    assert outcome.exit_code == 2, outcome
    assert f"{pg_cluster.host}:{pg_cluster.port}" in outcome.stderr and "'postgres'" in outcome.stderr
    assert "password authentication failed" in outcome.stderr
    assert "wrong-secret-Zq9" not in outcome.stderr + outcome.stdout
    assert received_addresses(smtp_server) == []

    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    project.configure(log={"url": pg_cluster.url("no_such_db")})
    outcome = project.send("--yes")
    assert outcome.exit_code == 2 and "no_such_db" in outcome.stderr, outcome
    assert pg_cluster.password not in outcome.stderr

    closed = _closed_port()
    project.configure(log={"url": f"postgresql://u@127.0.0.1:{closed}/db"})
    outcome = project.send("--yes")
    assert outcome.exit_code == 2 and f"127.0.0.1:{closed}" in outcome.stderr, outcome
    assert received_addresses(smtp_server) == []


def test_password_in_url_is_a_config_error(tmp_path):
    project = pg_project(tmp_path, None, "postgresql://u:hunter2secret@127.0.0.1/db")
    outcome = project.cli("suppress", "list")
    assert outcome.exit_code == 2 and "log.url" in outcome.stderr
    assert "hunter2secret" not in outcome.stderr


def test_connection_lost_is_store_unavailable(pg_url, pg_cluster, tmp_path):
    store = open_store(LogConfig(path=tmp_path / "x", url=pg_url))
    with store:
        pid = store._run(lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[attr-defined]
        pg_cluster.admin(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(StoreUnavailableError) as caught:
            mark_sending(store, "c", "a@x.org", message_id="<1@x>")
        assert caught.value.exit_code == 75
        assert pg_cluster.password not in str(caught.value)


def test_migrations_from_empty_and_from_the_previous_version(pg_url, tmp_path):
    config = LogConfig(path=tmp_path / "x", url=pg_url)
    with pytest.raises(SendLogError, match="no send log"):
        open_store(config, create=False)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mailer_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mailer_schema VALUES (%s)", (SCHEMA_VERSION - 1,))
        from mailer.store.migrations import PG_MIGRATIONS

        for step in PG_MIGRATIONS[: SCHEMA_VERSION - 1]:
            for statement in step:
                conn.execute(statement)
    with open_store(config) as store:
        assert store.schema_version == SCHEMA_VERSION  # type: ignore[attr-defined]
        store.add_suppressions(["a@x.org"])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE mailer_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SendLogError, match="newer than this mailer"):
        open_store(config)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- schema 5 (feedback, recipient tags): the SQLite store's tests, on PostgreSQL -----

FEEDBACK_TESTS = [
    "test_feedback_is_recorded_with_its_suppression_in_one_write",
    "test_counts_by_kind_and_unique_recipients",
    "test_an_event_with_a_ref_counts_once",
    "test_bad_kind_or_source_is_refused_before_anything_is_written",
    "test_verp_token_resolves_through_the_send_log",
    "test_a_suppressed_row_that_is_later_mailed_keeps_its_tag",
    "test_engagement_history_over_all_campaigns_in_one_query",
]


@pytest.mark.parametrize("name", FEEDBACK_TESTS)
def test_feedback_store_on_postgresql(name, pg_url, tmp_path):
    import test_feedback_store

    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        getattr(test_feedback_store, name)(store)


def test_version_4_database_migrates_with_recipient_tags(pg_url, tmp_path):
    from mailer.core.tokens import recipient_tag
    from mailer.store.migrations import PG_MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mailer_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mailer_schema VALUES (4)")
        for statement in PG_MIGRATIONS[3]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO deliveries (campaign, recipient, address, domain, status, first_at, updated_at) "
            "VALUES ('c', 'ann@x.org', 'Ann@x.org', 'x.org', 'sent', 't', 't'), "
            "('c', 'line 3', NULL, '', 'invalid', 't', 't')"
        )
    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        assert store.find_by_recipient_tag(recipient_tag("ann@x.org")) == [("c", "Ann@x.org")]
        assert store.feedback_counts("c")["unsubscribed"] == 0
        from mailer.store.records import FeedbackEvent, FeedbackKind

        clicked = [FeedbackEvent("c", who, FeedbackKind.CLICKED, detail=url) for who, url in
                   [("ann@x.org", "https://a"), ("ann@x.org", "https://a"), ("bo@x.org", "https://a"),
                    ("bo@x.org", "https://b")]]  # fmt: skip
        assert store.record_feedback(clicked) == 4
        assert store.clicks_by_link("c") == [("https://a", 2, 3), ("https://b", 1, 1)]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT recipient_tag FROM deliveries WHERE status = 'invalid'").fetchone() == (None,)


def _schema_of(url: str) -> tuple[list[tuple], list[str]]:
    """The columns (table, name, type, nullable, default) and index definitions of a database."""
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, column_name"
        ).fetchall()
        indexes = [row[0] for row in conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")]
    return columns, sorted(indexes)


@pytest.mark.parametrize("start", range(4, SCHEMA_VERSION))
def test_every_earlier_version_migrates_to_the_schema_of_a_new_database(pg_url, pg_cluster, tmp_path, start):
    """From an empty database and from each earlier version (PostgreSQL logs began at 4),
    the same tables, columns and indexes; the rows of the earlier version are kept."""
    from mailer.store.migrations import PG_MIGRATIONS

    with open_store(LogConfig(path=tmp_path / "fresh", url=pg_url)):
        pass
    old = f"m{start}_" + pg_url.rsplit("/", 1)[1]
    pg_cluster.admin(f"CREATE DATABASE {old}")
    old_url = pg_cluster.url(old)
    with psycopg.connect(old_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE mailer_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mailer_schema VALUES (%s)", (start,))
        for step in PG_MIGRATIONS[:start]:
            for statement in step:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO deliveries (campaign, recipient, address, domain, status, first_at, updated_at) "
            "VALUES ('c', 'ann@x.org', 'Ann@x.org', 'x.org', 'sent', 't', 't')"
        )
        conn.execute(
            "INSERT INTO suppressions (address, reason, source, added_at) VALUES ('z@x.org', NULL, 'manual', 't')"
        )
    assert _schema_of(old_url) != _schema_of(pg_url)
    with open_store(LogConfig(path=tmp_path / "old", url=old_url)) as store:
        assert store.schema_version == SCHEMA_VERSION  # type: ignore[attr-defined]
        assert store.statuses("c", ["ann@x.org"]) == [Status.SENT]
        assert store.suppressed(["Z@x.org"]) == [True]
    assert _schema_of(old_url) == _schema_of(pg_url)
