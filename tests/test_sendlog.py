"""Tests of mailer.sendlog against real SQLite files, real flocks and real processes."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_support import delivery_row, is_suppressed, mark_sending, record_result, record_skipped, status_of

from mailer.core.addresses import address_problem
from mailer.core.errors import ContactsError, ExitCode, LockedError, SendLogError, UsageError
from mailer.core.outcomes import Status
from mailer.store.locks import CampaignLock, campaign_lock_path
from mailer.store.migrations import MIGRATIONS, SCHEMA_VERSION
from mailer.store.records import FAILED_CSV_HEADER, InvalidEntry
from mailer.store.sqlite import SendLog


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mailer.sqlite3"


@pytest.fixture
def log(db_path: Path, clock: FakeClock):
    with SendLog.open(db_path, clock=clock) as opened:
        yield opened


def start_child(code: str, *args: str) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter and wait until it prints ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"child did not get ready: {line!r}\n{err}")
    return proc


def kill_child(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


# --- pure helpers -----------------------------------------------------------------


def test_check_address_accepts_valid_and_explains_invalid() -> None:
    assert address_problem("jane@example.com") is None
    assert address_problem("Jane.Doe+news@Example.COM") is None
    assert "@" in address_problem("jane.example.com")
    assert address_problem("jane@") is not None
    assert address_problem("   ") == "the address is empty"


def test_campaign_lock_path_is_a_safe_distinct_file_beside_the_log(tmp_path: Path) -> None:
    db = tmp_path / "mailer.sqlite3"
    nasty = campaign_lock_path(db, "../../etc/passwd Ünïcode \x00 news")
    assert nasty.parent == tmp_path
    assert nasty.name.startswith("mailer.sqlite3.") and nasty.name.endswith(".lock")
    assert "/" not in nasty.name and "\x00" not in nasty.name
    assert campaign_lock_path(db, "a/b") != campaign_lock_path(db, "a_b")
    assert campaign_lock_path(db, "news") == campaign_lock_path(db, "news")
    assert "news" in campaign_lock_path(db, "news").name


# --- opening, schema, migrations ------------------------------------------------


def test_open_creates_a_wal_database_at_the_current_version(db_path: Path, clock: FakeClock) -> None:
    with SendLog.open(db_path, clock=clock) as log:
        assert log.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    assert {"deliveries", "runs", "suppressions"} <= tables


def test_reopening_keeps_the_data(db_path: Path, clock: FakeClock) -> None:
    with SendLog.open(db_path, clock=clock) as log:
        mark_sending(log, "news", "a@example.com", message_id="<1@x>")
    with SendLog.open(db_path, clock=clock) as log:
        assert status_of(log, "news", "a@example.com") == "sending"


def test_a_version_1_log_is_migrated_forward(db_path: Path, clock: FakeClock) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO deliveries (campaign, recipient, domain, status, attempts, first_at, updated_at) "
        "VALUES ('news', 'old@example.com', 'example.com', 'sent', 1, 't0', 't0')"
    )
    conn.close()

    with SendLog.open(db_path, clock=clock) as log:
        assert log.schema_version == SCHEMA_VERSION >= 3
        assert status_of(log, "news", "old@example.com") == "sent"
    conn = sqlite3.connect(db_path)
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    run_columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    assert {"deliveries_campaign_retry", "runs_campaign"} <= indexes
    assert "deliveries_campaign_status" not in indexes  # version 2's, dropped by version 3
    assert "journal_applied" in run_columns


def test_a_version_2_log_with_runs_is_migrated_forward(db_path: Path, clock: FakeClock) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for step in MIGRATIONS[:2]:
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO runs (campaign, pid, host, started_at) VALUES ('news', 1, 'h', 't0')")
    conn.execute(
        "INSERT INTO deliveries (campaign, recipient, domain, status, attempts, first_at, updated_at) "
        "VALUES ('news', 'gone@example.com', 'example.com', 'failed', 1, 't0', 't0')"
    )
    conn.close()

    with SendLog.open(db_path, clock=clock) as log:
        (run,) = log.list_runs("news")
        assert log.journal_applied(run.id) is None
        failed = io.StringIO()
        assert log.write_failed_csv("news", failed) == 1  # served by the new partial index
        assert "gone@example.com" in failed.getvalue()


def test_a_version_3_log_is_rekeyed_by_the_address_rule_with_its_data(db_path: Path, clock: FakeClock) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for step in MIGRATIONS[:3]:
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO runs (campaign, pid, host, started_at, journal_applied) VALUES ('news', 1, 'h', 't0', 77)"
    )
    rows = [
        # One person under three keys of v3: the sent row wins, whatever the order or time.
        ("news", "Ann@example.com", "deferred", 2, "t3"),
        ("news", "ann@example.com", "sent", 1, "t1"),
        ("news", "ANN@example.com", "failed", 1, "t2"),
        # sending wins over failed: it may have been delivered.
        ("news", "Bo@example.com", "failed", 1, "t2"),
        ("news", "bo@example.com", "sending", 1, "t1"),
        # Unicode case: one person too; deferred over invalid.
        ("news", "ÄNN@example.com", "invalid", 0, "t1"),
        ("news", "änn@example.com", "deferred", 3, "t2"),
        # Other campaigns and people keep their rows.
        ("other", "Ann@example.com", "deferred", 1, "t1"),
        ("news", "Cy@Example.com", "failed", 1, "t1"),
    ]
    for campaign, recipient, status, attempts, at in rows:
        conn.execute(
            "INSERT INTO deliveries (campaign, recipient, domain, status, attempts, first_at, updated_at) "
            "VALUES (?, ?, 'example.com', ?, ?, ?, ?)",
            (campaign, recipient, status, attempts, at, at),
        )
    for address, added in [
        ("Jane@example.com", "t1"),
        ("ÖMER@x.org", "t1"),
        ("ömer@x.org", "t2"),
        ("ann@xn--bcher-kva.example", "t1"),
        ("ann@bücher.example", "t2"),
    ]:
        conn.execute(
            "INSERT INTO suppressions (address, reason, source, added_at) VALUES (?, 'r', 'manual', ?)",
            (address, added),
        )
    conn.close()

    with SendLog.open(db_path, clock=clock) as log:
        assert log.schema_version == SCHEMA_VERSION
        assert log.statuses("news", ["ANN@EXAMPLE.COM", "bo@example.com", "Änn@example.com", "cy@example.com"]) == [
            Status.SENT,
            Status.SENDING,
            Status.DEFERRED,
            Status.FAILED,
        ]
        assert log.statuses("other", ["ann@example.com"]) == [Status.DEFERRED]
        assert sum(log.counts("news").values()) == 4 and sum(log.counts("other").values()) == 1
        assert delivery_row(db_path, "news", "änn@example.com").attempts == 3
        (run,) = log.list_runs("news")
        assert log.journal_applied(run.id) == 77
        assert log.suppressed(["jane@EXAMPLE.com", "ömer@x.org", "ann@bücher.example", "x@x.org"]) == [
            True,
            True,
            True,
            False,
        ]
        assert sorted(row.address for row in log.list_suppressions()) == [
            "ann@xn--bcher-kva.example",
            "jane@example.com",
            "ömer@x.org",
        ]
        failed = io.StringIO()
        assert log.write_failed_csv("news", failed) == 2
        assert "Cy@Example.com" in failed.getvalue()  # the address as written


def test_a_log_from_a_newer_mailer_is_refused(db_path: Path, clock: FakeClock) -> None:
    SendLog.open(db_path, clock=clock).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(SendLogError) as caught:
        SendLog.open(db_path, clock=clock)
    message = str(caught.value)
    assert str(db_path) in message
    assert f"version {SCHEMA_VERSION + 5}" in message
    assert "upgrade mailer" in message


def test_a_file_that_is_not_sqlite_gives_a_send_log_error(db_path: Path) -> None:
    db_path.write_bytes(b"name,email\n" * 500)
    with pytest.raises(SendLogError) as caught:
        SendLog.open(db_path)
    assert str(db_path) in str(caught.value)
    assert "not a SQLite database" in str(caught.value)
    assert caught.value.hint


def test_a_damaged_sqlite_file_gives_a_send_log_error(db_path: Path, clock: FakeClock) -> None:
    with SendLog.open(db_path, clock=clock) as log:
        record_result(log, "news", "a@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    data = bytearray(db_path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # keep the header, wreck every page
    db_path.write_bytes(bytes(data))
    with pytest.raises(SendLogError) as caught:
        with SendLog.open(db_path, clock=clock) as log:
            status_of(log, "news", "a@example.com")
    assert str(db_path) in str(caught.value)
    assert "damaged" in str(caught.value) or "not a SQLite database" in str(caught.value)


def test_another_programs_sqlite_database_is_not_taken_over(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(SendLogError, match="not a mailer send log"):
        SendLog.open(db_path)
    conn = sqlite3.connect(db_path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert tables == {"customers"}


def test_a_folder_or_a_missing_folder_gives_a_send_log_error(tmp_path: Path) -> None:
    with pytest.raises(SendLogError, match="folder, not a send log"):
        SendLog.open(tmp_path)
    with pytest.raises(SendLogError, match="does not exist"):
        SendLog.open(tmp_path / "nowhere" / "mailer.sqlite3")


def test_open_without_create_refuses_a_missing_log(db_path: Path) -> None:
    with pytest.raises(SendLogError, match="no send log here yet"):
        SendLog.open(db_path, create=False)
    assert not db_path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unreadable_log_gives_a_send_log_error(db_path: Path) -> None:
    SendLog.open(db_path).close()
    db_path.chmod(0)
    try:
        with pytest.raises(SendLogError) as caught:
            SendLog.open(db_path)
        assert str(db_path) in str(caught.value)
    finally:
        db_path.chmod(0o600)


def test_a_closed_log_raises_send_log_error(db_path: Path) -> None:
    log = SendLog.open(db_path)
    log.close()
    log.close()  # idempotent
    with pytest.raises(SendLogError, match="closed"):
        status_of(log, "news", "a@example.com")


# --- deliveries ---------------------------------------------------------------------


def test_status_of_is_none_for_an_unknown_recipient(log: SendLog) -> None:
    assert status_of(log, "news", "nobody@example.com") is None
    assert delivery_row(log.path, "news", "nobody@example.com") is None


def test_mark_sending_then_record_result(log: SendLog, clock: FakeClock) -> None:
    mark_sending(log, "news", "Jane@Example.COM", message_id="<m1@acme>", line=7)
    row = delivery_row(log.path, "news", "Jane@example.com")
    assert row.status == Status.SENDING and row.attempts == 1
    assert row.message_id == "<m1@acme>" and row.line == 7
    assert row.first_at == row.updated_at == "2026-03-01T09:00:00.000+00:00"

    clock.advance(2.5)
    record_result(log, "news", "Jane@example.com", status="sent", smtp_code=250, smtp_reply="2.0.0 Ok: queued")
    row = delivery_row(log.path, "news", "Jane@example.com")
    assert row.status == "sent"
    assert (row.smtp_code, row.smtp_reply) == (250, "2.0.0 Ok: queued")
    assert row.message_id == "<m1@acme>"  # kept when record_result gives none
    assert row.attempts == 1
    assert row.first_at == "2026-03-01T09:00:00.000+00:00"
    assert row.updated_at == "2026-03-01T09:00:02.500+00:00"


def test_the_recipient_key_ignores_case_local_part_included(log: SendLog) -> None:
    record_result(log, "news", "Jane@Example.COM", status="sent", smtp_code=250, smtp_reply="ok")
    assert status_of(log, "news", "Jane@example.com") == "sent"
    assert status_of(log, "news", "  Jane@EXAMPLE.com ") == "sent"
    assert status_of(log, "news", "jane@example.com") == "sent"
    assert status_of(log, "news", "janet@example.com") is None
    assert status_of(log, "other-campaign", "Jane@example.com") is None


def test_each_mark_sending_is_one_more_attempt(log: SendLog) -> None:
    mark_sending(log, "news", "a@example.com", message_id="<1@x>", line=3)
    record_result(log, "news", "a@example.com", status="deferred", smtp_code=451, smtp_reply="try later")
    mark_sending(log, "news", "a@example.com", message_id="<2@x>")
    row = delivery_row(log.path, "news", "a@example.com")
    assert row.attempts == 2
    assert row.status == "sending"
    assert row.message_id == "<2@x>"
    assert row.line == 3  # not forgotten when the retry gives no line
    assert row.smtp_code == 451  # the last reply stays until a new one comes


def test_record_result_without_mark_sending_counts_one_attempt(log: SendLog) -> None:
    record_result(
        log,
        "news",
        "b@example.com",
        status="failed",
        smtp_code=550,
        smtp_reply="5.1.1 no such user",
        message_id="<x@y>",
    )
    row = delivery_row(log.path, "news", "b@example.com")
    assert (row.status, row.attempts, row.message_id) == ("failed", 1, "<x@y>")


def test_record_result_accepts_a_missing_reply_code(log: SendLog) -> None:
    record_result(log, "news", "c@example.com", status="deferred", smtp_code=None, smtp_reply="connection timed out")
    row = delivery_row(log.path, "news", "c@example.com")
    assert row.smtp_code is None and row.smtp_reply == "connection timed out"


@pytest.mark.parametrize("status", ["invalid", "suppressed", "pending"])
def test_a_delivery_event_of_another_status_is_refused(log: SendLog, status: str) -> None:
    with pytest.raises(ValueError):
        record_result(log, "news", "a@example.com", status=status, smtp_code=250, smtp_reply="ok")
    assert status_of(log, "news", "a@example.com") is None


def test_statuses_and_suppressed_answer_a_batch_in_order(log: SendLog) -> None:
    # More than one bulk query's worth (500), with hits spread over all of them.
    addresses = [f"user{i}@example.com" for i in range(1200)]
    log.record_events("news", [(a, "sent", 250, "ok", None, i) for i, a in enumerate(addresses) if i % 7 == 0])
    log.record_events("news", [("user3@example.com", "sending", None, None, "<m@x>", 3)])
    log.add_suppressions([a for i, a in enumerate(addresses) if i % 11 == 0])
    asked = [*reversed(addresses), "user3@example.com", "nobody@example.com"]
    statuses = log.statuses("news", asked)
    assert len(statuses) == len(asked)
    expected = {a: Status.SENT for i, a in enumerate(addresses) if i % 7 == 0} | {"user3@example.com": Status.SENDING}
    assert statuses == [expected.get(a) for a in asked]
    assert log.suppressed(asked) == [a in {x for i, x in enumerate(addresses) if i % 11 == 0} for a in asked]
    assert log.statuses("other", asked[:3]) == [None, None, None]
    assert log.statuses("news", []) == [] and log.suppressed([]) == []


@pytest.mark.parametrize("status", ["sent", "failed", "sending"])
def test_a_skipped_row_never_overwrites_a_real_message(log: SendLog, status: str) -> None:
    record_result(log, "news", "a@example.com", status="deferred", smtp_code=451, smtp_reply="later")
    log.record_events("news", [("a@example.com", status, 250, "ok", "<m@x>", 2)])
    record_skipped(log, "news", "a@example.com", status="invalid", reason="attachment missing", line=2)
    assert status_of(log, "news", "a@example.com") == status
    record_skipped(log, "news", "b@example.com", status="invalid", reason="attachment missing", line=3)
    record_result(log, "news", "c@example.com", status="deferred", smtp_code=451, smtp_reply="later")
    record_skipped(log, "news", "c@example.com", status="suppressed", reason="on the suppression list", line=4)
    assert log.statuses("news", ["b@example.com", "c@example.com"]) == [Status.INVALID, Status.SUPPRESSED]


def test_record_skipped_keeps_any_value_and_the_reason(log: SendLog) -> None:
    record_skipped(log, "news", "jane@", status="invalid", reason="missing domain", line=4)
    record_skipped(log, "news", "", status="invalid", reason="empty address", line=42)
    record_skipped(log, "news", "Gone@Example.com", status="suppressed", reason="unsubscribed", line=9)

    bad = delivery_row(log.path, "news", "jane@")
    assert (bad.status, bad.reason, bad.line, bad.attempts) == ("invalid", "missing domain", 4, 0)
    assert status_of(log, "news", "line 42") == "invalid"
    assert delivery_row(log.path, "news", "line 42").reason == "empty address"
    assert delivery_row(log.path, "news", "Gone@example.com").reason == "unsubscribed"


@pytest.mark.parametrize("status", ["sent", "failed", "deferred", "sending"])
def test_record_skipped_rejects_other_statuses(log: SendLog, status: str) -> None:
    with pytest.raises(ValueError):
        record_skipped(log, "news", "a@example.com", status=status, reason="x", line=1)


def test_counts_by_status_include_zeros_and_stay_per_campaign(log: SendLog) -> None:
    record_result(log, "news", "a@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    record_result(log, "news", "b@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    record_result(log, "news", "c@example.com", status="failed", smtp_code=550, smtp_reply="no")
    mark_sending(log, "news", "d@example.com", message_id="<d@x>")
    record_skipped(log, "news", "bad", status="invalid", reason="no @", line=5)
    record_result(log, "other", "a@example.com", status="deferred", smtp_code=421, smtp_reply="busy")
    assert log.counts("news") == {
        "sent": 2,
        "failed": 1,
        "deferred": 0,
        "invalid": 1,
        "suppressed": 0,
        "sending": 1,
    }
    assert log.counts("other")["deferred"] == 1
    assert sum(log.counts("nothing-yet").values()) == 0


# --- reports ------------------------------------------------------------------------


def fill_campaign(log: SendLog) -> None:
    for i in range(3):
        record_result(log, "news", f"u{i}@gmail.com", status="sent", smtp_code=250, smtp_reply="2.0.0 ok")
    record_result(log, "news", "gone@gmail.com", status="failed", smtp_code=550, smtp_reply="5.1.1 unknown user")
    record_result(log, "news", "a@Yahoo.com", status="deferred", smtp_code=421, smtp_reply="4.7.0 try later")
    record_result(log, "news", "b@yahoo.com", status="sent", smtp_code=250, smtp_reply="2.0.0 ok")
    mark_sending(log, "news", "limbo@example.org", message_id="<limbo@acme>", line=12)
    record_skipped(log, "news", "nobody", status="invalid", reason="no @", line=20)


def test_report_counts_by_status_domain_and_reply(log: SendLog) -> None:
    fill_campaign(log)
    record_result(log, "other", "x@gmail.com", status="sent", smtp_code=250, smtp_reply="ok")

    report = log.report("news")
    assert report.campaign == "news"
    assert report.total == 8
    assert report.by_status["sent"] == 4 and report.by_status["sending"] == 1
    domains = {d.domain: d for d in report.by_domain}
    assert report.by_domain[0].domain == "gmail.com"
    assert domains["gmail.com"].total == 4
    assert domains["gmail.com"].by_status == {"sent": 3, "failed": 1}
    assert domains["yahoo.com"].by_status == {"sent": 1, "deferred": 1}
    assert domains[""].by_status == {"invalid": 1}
    assert sum(d.total for d in report.by_domain) == report.total
    codes = {r.code: r for r in report.by_smtp_code}
    assert report.by_smtp_code[0].code == 250 and codes[250].count == 4
    assert codes[550].example_reply == "5.1.1 unknown user"
    assert [row.recipient for row in report.unknown_outcome] == ["limbo@example.org"]
    assert report.unknown_outcome[0].message_id == "<limbo@acme>"


def test_report_over_all_campaigns_and_domain_limit(log: SendLog) -> None:
    fill_campaign(log)
    record_result(log, "other", "x@gmail.com", status="sent", smtp_code=250, smtp_reply="ok")
    everything = log.report(None)
    assert everything.campaign is None
    assert everything.total == 9
    assert everything.by_status["sent"] == 5
    top = log.report(None, max_domains=1)
    assert [d.domain for d in top.by_domain] == ["gmail.com"]


def test_report_to_dict_is_json(log: SendLog) -> None:
    fill_campaign(log)
    data = json.loads(json.dumps(log.report("news").to_dict()))
    assert data["version"] == 1
    assert data["by_status"]["failed"] == 1
    assert data["unknown_outcome"][0]["status"] == "sending"
    assert data["unknown_outcome"][0]["line"] == 12
    assert {"domain": "yahoo.com", "total": 2, "by_status": {"sent": 1, "deferred": 1}} in data["by_domain"]


def test_campaigns_lists_names_with_last_activity(log: SendLog, clock: FakeClock) -> None:
    record_result(log, "spring", "a@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    clock.advance(3600)
    record_result(log, "summer", "a@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    record_result(log, "summer", "b@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    clock.advance(60)
    log.start_run("autumn", template="autumn.txt.j2", contacts="c.csv")
    summaries = log.campaigns()
    assert [c.name for c in summaries] == ["autumn", "summer", "spring"]
    assert summaries[1].recipients == 2
    assert summaries[1].last_activity == "2026-03-01T10:00:00.000+00:00"
    assert summaries[0].recipients == 0


def test_write_failed_csv_gives_a_contacts_file_of_failed_and_deferred(log: SendLog) -> None:
    fill_campaign(log)
    record_result(
        log, "news", "multi@example.net", status="failed", smtp_code=554, smtp_reply="5.7.1 rejected,\nsee policy"
    )
    out = io.StringIO()
    written = log.write_failed_csv("news", out)
    assert written == 3
    out.seek(0)
    reader = csv.DictReader(out)
    assert tuple(reader.fieldnames) == FAILED_CSV_HEADER
    rows = list(reader)
    assert sorted(row["email"] for row in rows) == ["a@Yahoo.com", "gone@gmail.com", "multi@example.net"]
    by_email = {row["email"]: row for row in rows}
    assert by_email["a@Yahoo.com"]["status"] == "deferred"
    assert by_email["multi@example.net"]["smtp_reply"] == "5.7.1 rejected,\nsee policy"
    assert by_email["gone@gmail.com"]["smtp_code"] == "550"


def test_write_failed_csv_of_a_clean_campaign_has_only_the_header(log: SendLog) -> None:
    record_result(log, "news", "a@example.com", status="sent", smtp_code=250, smtp_reply="ok")
    out = io.StringIO()
    assert log.write_failed_csv("news", out) == 0
    assert out.getvalue() == "email,status,smtp_code,smtp_reply\n"


# --- runs ---------------------------------------------------------------------------


def test_runs_are_recorded_from_start_to_finish(log: SendLog, clock: FakeClock) -> None:
    run_id = log.start_run("news", template="news.md.j2", contacts="contacts.csv")
    (run,) = log.list_runs("news")
    assert run.id == run_id and run.finished_at is None and run.pid == os.getpid()
    assert run.host and run.started_at == "2026-03-01T09:00:00.000+00:00"
    clock.advance(90)
    log.finish_run(run_id, counts={"sent": 10, "failed": 1}, interrupted=True)
    (run,) = log.list_runs("news")
    assert run.finished_at == "2026-03-01T09:01:30.000+00:00"
    assert run.interrupted is True
    assert run.counts == {"sent": 10, "failed": 1}
    assert (run.template, run.contacts) == ("news.md.j2", "contacts.csv")
    assert log.list_runs("other") == []


def test_finish_run_of_an_unknown_run_is_an_error(log: SendLog) -> None:
    with pytest.raises(ValueError, match="no run with id 99"):
        log.finish_run(99, counts={}, interrupted=False)


# --- concurrency and durability -------------------------------------------------------


def test_threads_recording_at_once_lose_nothing(log: SendLog) -> None:
    threads_count, per_thread = 8, 250
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(per_thread):
                address = f"t{n}-{i}@example.com"
                mark_sending(log, "news", address, message_id=f"<{n}.{i}@x>")
                mark_sending(log, "news", "shared@example.com", message_id=f"<s{n}.{i}@x>")
                record_result(log, "news", address, status="sent", smtp_code=250, smtp_reply="ok")
                assert status_of(log, "news", address) == "sent"
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    counts = log.counts("news")
    assert counts["sent"] == threads_count * per_thread
    assert counts["sending"] == 1
    assert delivery_row(log.path, "news", "shared@example.com").attempts == threads_count * per_thread


def test_bulk_suppression_writes_and_delivery_writes_interleave_safely(log: SendLog) -> None:
    # add_suppressions runs a multi-statement transaction; without the lock another
    # thread's write would land inside it (or BEGIN would fail) and counts would be off.
    errors: list[BaseException] = []
    added_total = []

    def suppressor(n: int) -> None:
        try:
            for batch in range(20):
                added, _ = log.add_suppressions([f"s{n}-{batch}-{i}@example.com" for i in range(10)])
                added_total.append(added)
        except BaseException as exc:
            errors.append(exc)

    def sender(n: int) -> None:
        try:
            for i in range(200):
                mark_sending(log, "news", f"r{n}-{i}@example.com", message_id="<m@x>")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=suppressor, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(added_total) == 4 * 20 * 10
    assert sum(1 for _ in log.list_suppressions()) == 800
    assert log.counts("news")["sending"] == 800


def test_a_killed_process_leaves_its_rows_on_disk(db_path: Path) -> None:
    proc = start_child(
        """
        import sys, time
        from pathlib import Path
        from mailer.store.sqlite import SendLog
        log = SendLog.open(Path(sys.argv[1]))
        log.record_events("news", [("done@example.com", "sent", 250, "ok", None, None)])
        log.record_events("news", [("inflight@example.com", "sending", None, None, "<inflight@acme>", 2)])
        print("ready", flush=True)
        time.sleep(60)
        """,
        str(db_path),
    )
    kill_child(proc)
    with SendLog.open(db_path) as log:
        row = delivery_row(log.path, "news", "inflight@example.com")
        assert row is not None and row.status == "sending"
        assert row.message_id == "<inflight@acme>" and row.attempts == 1
        assert status_of(log, "news", "done@example.com") == "sent"
        assert [r.recipient for r in log.report("news").unknown_outcome] == ["inflight@example.com"]


# --- the campaign lock ------------------------------------------------------------


def test_a_second_lock_on_the_same_campaign_is_refused_until_released(log: SendLog) -> None:
    first = log.acquire_lock("news")
    assert first.held
    with pytest.raises(LockedError) as caught:
        log.acquire_lock("news")
    assert f"pid {os.getpid()}" in str(caught.value)
    assert caught.value.exit_code == ExitCode.TEMPFAIL == 75
    with log.acquire_lock("other-campaign") as other:  # campaigns do not block each other
        assert other.held
    first.release()
    assert not first.held
    with log.acquire_lock("news") as again:
        assert json.loads(again.path.read_text())["pid"] == os.getpid()
    assert not again.held
    assert not again.path.exists()  # no lock file per campaign piles up beside the log
    assert sorted(p.name for p in log.path.parent.iterdir() if p.name.endswith(".lock")) == []


def test_a_lock_file_removed_by_its_releaser_is_not_taken_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = CampaignLock.acquire(path, "news")
    waiting = open(path, "a+")  # a second run opened the file just before the first let go  # noqa: SIM115
    first.release()  # which removes it
    fcntl.flock(waiting.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # its flock now succeeds, on a removed file
    try:
        with CampaignLock.acquire(path, "news") as third:  # so the lock is free at the path
            assert third.held
            with pytest.raises(LockedError):
                CampaignLock.acquire(path, "news")
    finally:
        waiting.close()


def test_a_full_disk_when_the_lock_is_taken_is_a_clear_error(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        from mailer.core.errors import SendLogError
        from mailer.store.locks import CampaignLock
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        try:
            CampaignLock.acquire(Path(sys.argv[1]), "news")
        except SendLogError as exc:
            print("error:", exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.lock")], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stdout and "cannot write the lock file" in result.stdout, result.stdout


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(db_path: Path, clock: FakeClock) -> None:
    SendLog.open(db_path).close()
    proc = start_child(
        """
        import sys, time
        from pathlib import Path
        from mailer.store.sqlite import SendLog
        log = SendLog.open(Path(sys.argv[1]))
        lock = log.acquire_lock("news letter/2026")
        print("ready", flush=True)
        time.sleep(60)
        """,
        str(db_path),
    )
    try:
        with SendLog.open(db_path, clock=clock) as log:
            with pytest.raises(LockedError) as caught:
                log.acquire_lock("news letter/2026")
            message = str(caught.value)
            assert f"pid {proc.pid}" in message
            assert "started 20" in message
            assert str(campaign_lock_path(db_path, "news letter/2026")) in message
            assert caught.value.hint
    finally:
        kill_child(proc)
    with SendLog.open(db_path, clock=clock) as log:
        with log.acquire_lock("news letter/2026") as lock:
            holder = json.loads(lock.path.read_text())
            assert holder["pid"] == os.getpid()
            assert holder["started_at"] == "2026-03-01T09:00:00+00:00"


def test_no_path_to_the_same_send_log_gets_a_second_run_in(tmp_path: Path, clock: FakeClock) -> None:
    real = tmp_path / "data" / "mailer.sqlite3"
    (tmp_path / "data" / "sub").mkdir(parents=True)
    SendLog.open(real).close()
    link = tmp_path / "link.sqlite3"
    link.symlink_to(real)
    (tmp_path / "linked-dir").symlink_to(tmp_path / "data")
    other_paths = [
        real,
        tmp_path / "data" / "sub" / ".." / "mailer.sqlite3",
        tmp_path / "linked-dir" / "mailer.sqlite3",
    ]
    proc = start_child(
        """
        import sys, time
        from pathlib import Path
        from mailer.store.sqlite import SendLog
        log = SendLog.open(Path(sys.argv[1]))
        lock = log.acquire_lock("news")
        print("ready", flush=True)
        time.sleep(60)
        """,
        str(link),
    )
    with SendLog.open(link) as linked:
        journal = linked.journal_path("news")
    try:
        for path in other_paths:
            with SendLog.open(path, clock=clock) as log, pytest.raises(LockedError):
                log.acquire_lock("news")
            assert log.journal_path("news") == journal  # recovery finds it by any path
    finally:
        kill_child(proc)
    with SendLog.open(other_paths[1], clock=clock) as log, log.acquire_lock("news"):
        pass


def test_a_lock_file_without_details_still_gives_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    held = CampaignLock.acquire(path, "news")
    path.write_text("")  # as if the holder had not written its details yet
    try:
        with pytest.raises(LockedError, match="pid unknown"):
            CampaignLock.acquire(path, "news")
    finally:
        held.release()


# --- suppressions -----------------------------------------------------------------


def test_add_and_check_suppressions(log: SendLog) -> None:
    added = log.add_suppressions(["Jane@Example.com", "bob@example.com"], reason="unsubscribed", source="manual")
    assert added == (2, 0)
    assert log.add_suppressions(["jane@example.COM", "new@example.com"], source="bounce") == (1, 1)
    assert is_suppressed(log, "Jane@example.com")
    assert is_suppressed(log, "JANE@EXAMPLE.COM")  # local-part case is ignored on purpose
    assert not is_suppressed(log, "janet@example.com")
    rows = {row.address: row for row in log.list_suppressions()}
    assert rows["jane@example.com"].reason == "unsubscribed"
    assert rows["jane@example.com"].source == "manual"
    assert rows["new@example.com"].source == "bounce"
    assert rows["bob@example.com"].added_at == "2026-03-01T09:00:00.000+00:00"


def test_add_suppressions_with_an_invalid_address_adds_nothing(log: SendLog) -> None:
    with pytest.raises(UsageError, match="'jane@'"):
        log.add_suppressions(["ok@example.com", "jane@"])
    assert list(log.list_suppressions()) == []


def test_add_suppressions_rejects_an_unknown_source(log: SendLog) -> None:
    with pytest.raises(ValueError, match="source"):
        log.add_suppressions(["a@example.com"], source="spamtrap")
    assert not is_suppressed(log, "a@example.com")


def test_remove_suppressions(log: SendLog) -> None:
    log.add_suppressions(["a@example.com", "b@example.com", "c@example.com"])
    assert log.remove_suppressions(["A@EXAMPLE.com", "b@example.com", "never@example.com"]) == 2
    assert [row.address for row in log.list_suppressions()] == ["c@example.com"]


def test_list_suppressions_pages_through_everything(log: SendLog) -> None:
    addresses = [f"user{i:03}@example.com" for i in range(25)]
    log.add_suppressions(reversed(addresses))
    listed = [row.address for row in log.list_suppressions(batch_size=4)]
    assert listed == addresses


def test_import_a_csv_with_an_email_column(log: SendLog, tmp_path: Path) -> None:
    source = tmp_path / "unsubscribes.csv"
    source.write_text(
        "\ufeffName,E-Mail,Reason\n"
        "Jane,jane@example.com,complaint\n"
        "Bob,not-an-address,\n"
        "\n"
        "Ann,Ann@Example.ORG,\n"
        "Empty,,\n"
        "Jane again,JANE@example.com,\n",
        encoding="utf-8",
    )
    result = log.import_suppressions(source, reason="list import")
    assert (result.added, result.already_present) == (2, 1)
    assert result.invalid == [InvalidEntry(3, "not-an-address"), InvalidEntry(6, "")]
    rows = {row.address: row for row in log.list_suppressions()}
    assert set(rows) == {"jane@example.com", "ann@example.org"}
    assert rows["jane@example.com"].reason == "complaint"
    assert rows["ann@example.org"].reason == "list import"
    assert rows["ann@example.org"].source == "import"


def test_import_a_semicolon_csv(log: SendLog, tmp_path: Path) -> None:
    source = tmp_path / "export.csv"
    source.write_text("id;mail\n1;a@example.com\n2;b@example.com\n")
    result = log.import_suppressions(source)
    assert (result.added, result.already_present, result.invalid) == (2, 0, [])
    assert is_suppressed(log, "b@example.com")


def test_import_a_plain_list_skips_blanks_and_comments(log: SendLog, tmp_path: Path) -> None:
    source = tmp_path / "bounces.txt"
    source.write_text(
        "# hard bounces, March\n"
        "a@example.com\n"
        "\n"
        "   # indented comment\n"
        "  B@Example.com  \n"
        "a@example.com\n"
        "jane@\n"
        "@example.com\n"
    )
    result = log.import_suppressions(source, source="bounce")
    assert (result.added, result.already_present) == (2, 1)
    assert result.invalid == [(7, "jane@"), (8, "@example.com")]
    assert is_suppressed(log, "B@example.com")
    assert {row.source for row in log.list_suppressions()} == {"bounce"}


def test_import_a_csv_without_an_email_column_is_an_error(log: SendLog, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_text("name,address\nJane,jane@example.com\n")
    with pytest.raises(ContactsError) as caught:
        log.import_suppressions(source)
    assert "no email column" in str(caught.value)
    assert str(source) in str(caught.value)
    assert list(log.list_suppressions()) == []


def test_import_a_missing_or_binary_file_is_an_error(log: SendLog, tmp_path: Path) -> None:
    with pytest.raises(ContactsError, match="not found"):
        log.import_suppressions(tmp_path / "missing.txt")
    binary = tmp_path / "list.xlsx"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00garbage")
    with pytest.raises(ContactsError, match="UTF-8"):
        log.import_suppressions(binary)


def test_import_an_empty_file_adds_nothing(log: SendLog, tmp_path: Path) -> None:
    source = tmp_path / "empty.txt"
    source.write_text("# nothing here\n\n")
    result = log.import_suppressions(source)
    assert (result.added, result.already_present, result.invalid) == (0, 0, [])
