"""The delivery journal: events on record before SQLite has them, recovered exactly once after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from store_support import is_suppressed

from mailer.core.errors import SendLogError
from mailer.send import journal as journal_module
from mailer.send.journal import JournalWriter, recover, recover_all
from mailer.store.locks import campaign_file_path
from mailer.store.sqlite import SendLog

CAMPAIGN = "news"


def journal_path(db_path: Path, campaign: str) -> Path:
    """Where the SQLite store keeps the journal of ``campaign`` (SendLog.journal_path)."""
    return campaign_file_path(db_path, campaign, "journal")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mailer.sqlite3"


def sending(n: int) -> tuple:
    return (f"user{n}@example.com", "sending", None, None, f"<{n}@acme.example>", n + 2)


def sent(n: int) -> tuple:
    return (f"user{n}@example.com", "sent", 250, "2.0.0 queued", f"<{n}@acme.example>", None)


def rows(db_path: Path) -> dict[str, tuple[str, int]]:
    """recipient -> (status, attempts) for the campaign."""
    with SendLog.open(db_path, create=False) as log, log._guard as conn:
        found = conn.execute(
            "SELECT recipient, status, attempts FROM deliveries WHERE campaign = ?", (CAMPAIGN,)
        ).fetchall()
    return {recipient: (status, attempts) for recipient, status, attempts in found}


def new_run(db_path: Path) -> int:
    with SendLog.open(db_path) as log:
        return log.start_run(CAMPAIGN, template=None, contacts=None)


def write_journal(db_path: Path, run_id: int, body: bytes) -> Path:
    path = journal_path(db_path, CAMPAIGN)
    header = json.dumps({"mailer_journal": 1, "campaign": CAMPAIGN, "run": run_id}).encode() + b"\n"
    path.write_bytes(header + body)
    return path


def line(event: tuple) -> bytes:
    return json.dumps(event).encode() + b"\n"


def test_a_run_that_ends_normally_applies_everything_and_removes_its_journal(db_path):
    run_id = new_run(db_path)
    with SendLog.open(db_path) as log:
        writer = JournalWriter(log, CAMPAIGN, run_id)
        assert writer.path.exists()
        for n in range(50):
            writer.append(sending(n))
            writer.append(sent(n))
        writer.append(sending(50))
        writer.append((f"user{50}@example.com", "failed", 550, "5.1.1 no such user", "<50@acme.example>", None))
        writer.close()
        assert not writer.path.exists()
        assert is_suppressed(log, "user50@example.com")  # a hard bounce, suppressed in the same commit
    statuses = rows(db_path)
    assert statuses == {**{f"user{n}@example.com": ("sent", 1) for n in range(50)}, "user50@example.com": ("failed", 1)}


# A real process writes a journal, is killed with SIGKILL, and the test recovers it.
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mailer.send import journal
    from mailer.store.sqlite import SendLog

    db, run_id, applied_pairs, more_pairs, truncate_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    journal._BATCH_SECONDS = 3600  # apply only when told to (a full batch), never by the clock
    journal._BATCH_EVENTS = 2 * applied_pairs
    journal._TRUNCATE_AT = truncate_at
    log = SendLog.open(Path(db))
    lock = log.acquire_lock("news")
    writer = journal.JournalWriter(log, "news", run_id)
    def event(n, status):
        if status == "sending":
            return (f"user{n}@example.com", "sending", None, None, f"<{n}@acme.example>", n + 2)
        return (f"user{n}@example.com", "sent", 250, "2.0.0 queued", f"<{n}@acme.example>", None)
    for n in range(applied_pairs):
        writer.append(event(n, "sending"))
        writer.append(event(n, "sent"))
    while log.journal_applied(run_id) is None:  # the full batch went to SQLite
        time.sleep(0.01)
    journal._BATCH_EVENTS = 10**9
    while truncate_at < 10**9 and log.journal_applied(run_id) != writer._header_size:  # and the file was cut back
        time.sleep(0.01)
    for n in range(applied_pairs, applied_pairs + more_pairs):
        writer.append(event(n, "sending"))
        writer.append(event(n, "sent"))
    writer.append(event(10**6, "sending"))  # in flight when the kill comes
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def start_killed_writer(db_path: Path, run_id: int, *, applied_pairs: int, more_pairs: int, truncate_at: int = 10**9):
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_WRITER,
            str(db_path),
            str(run_id),
            str(applied_pairs),
            str(more_pairs),
            str(truncate_at),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = process.stdout.readline()
    assert ready == "ready\n", "the writer process did not get ready"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    process.stdout.close()


def test_a_killed_run_is_recovered_exactly_once(db_path):
    run_id = new_run(db_path)
    process = start_killed_writer(db_path, run_id, applied_pairs=10, more_pairs=5)
    # While the run lives, its journal is its own: recovery leaves it alone.
    with SendLog.open(db_path) as log:
        assert recover(log, CAMPAIGN) == 0
        assert recover_all(log) == 0
    assert journal_path(db_path, CAMPAIGN).exists()
    kill(process)

    before = rows(db_path)
    assert len(before) == 10 and all(value == ("sent", 1) for value in before.values())
    with SendLog.open(db_path) as log:
        assert recover(log, CAMPAIGN) == 11  # five sending/sent pairs and the one in flight
        assert recover(log, CAMPAIGN) == 0
    after = rows(db_path)
    assert after == {
        **{f"user{n}@example.com": ("sent", 1) for n in range(15)},
        f"user{10**6}@example.com": ("sending", 1),
    }
    assert not journal_path(db_path, CAMPAIGN).exists()


def test_a_journal_cut_back_mid_run_is_still_recovered_exactly_once(db_path):
    run_id = new_run(db_path)
    # A 1-byte threshold: the writer cuts the file back right after the first batch.
    process = start_killed_writer(db_path, run_id, applied_pairs=10, more_pairs=3, truncate_at=1)
    kill(process)
    with SendLog.open(db_path) as log:
        assert recover_all(log) == 7
    assert rows(db_path) == {
        **{f"user{n}@example.com": ("sent", 1) for n in range(13)},
        f"user{10**6}@example.com": ("sending", 1),
    }


def test_the_journal_stays_small_on_a_long_run(db_path, monkeypatch):
    monkeypatch.setattr(journal_module, "_TRUNCATE_AT", 4096)
    monkeypatch.setattr(journal_module, "_BATCH_SECONDS", 0.005)
    run_id = new_run(db_path)
    sizes = []
    with SendLog.open(db_path) as log:
        writer = JournalWriter(log, CAMPAIGN, run_id)
        for n in range(2000):
            writer.append(sending(n))
            writer.append(sent(n))
            if n % 100 == 0:
                time.sleep(0.02)
                sizes.append(os.path.getsize(writer.path))
        writer.close()
    # 2,000 pairs are ~300 KB of journal; cut back every 4 KB applied, it never holds them all.
    assert max(sizes) < 150_000, sizes
    assert rows(db_path) == {f"user{n}@example.com": ("sent", 1) for n in range(2000)}


def test_a_line_cut_off_by_the_kill_is_ignored(db_path):
    run_id = new_run(db_path)
    write_journal(db_path, run_id, line(sending(1)) + line(sent(1)) + line(sending(2))[:-9])
    with SendLog.open(db_path) as log:
        assert recover(log, CAMPAIGN) == 2
    assert rows(db_path) == {"user1@example.com": ("sent", 1)}


def test_a_run_killed_between_moving_the_offset_back_and_the_cut_back_applies_it_all_again(db_path):
    # The writer moves the log's offset back to the header first, then cuts the file:
    # killed in between, the file still holds everything, and it is applied again
    # (statuses unchanged; only the attempts count the replayed "sending" events).
    run_id = new_run(db_path)
    events = [sending(1), sent(1)]
    with SendLog.open(db_path) as log:
        log.record_events(CAMPAIGN, events, journal=(run_id, 5000))
    path = write_journal(db_path, run_id, b"".join(line(e) for e in events))
    with SendLog.open(db_path) as log:
        log.set_journal_applied(run_id, path.read_bytes().index(b"\n") + 1)
        assert recover(log, CAMPAIGN) == 2
    assert rows(db_path) == {"user1@example.com": ("sent", 2)}
    assert not path.exists()


def test_recovered_hard_bounces_are_suppressed(db_path):
    run_id = new_run(db_path)
    bounce = ("gone@example.com", "failed", 550, "5.1.1 <gone@example.com>: user unknown", "<9@acme.example>", None)
    write_journal(
        db_path, run_id, line(("gone@example.com", "sending", None, None, "<9@acme.example>", 3)) + line(bounce)
    )
    with SendLog.open(db_path) as log:
        assert recover(log, CAMPAIGN) == 2
        assert is_suppressed(log, "gone@example.com")


def test_a_damaged_journal_is_an_error_that_keeps_the_file(db_path):
    run_id = new_run(db_path)
    path = write_journal(db_path, run_id, line(sending(1)) + b"{not json\n" + line(sent(1)))
    with SendLog.open(db_path) as log, pytest.raises(SendLogError) as caught:
        recover(log, CAMPAIGN)
    message = str(caught.value)
    assert "journal of campaign 'news' is damaged" in message and str(path) in message
    assert "Keep the file" in message and "move it aside" not in message
    assert path.exists()
    assert rows(db_path) == {}  # nothing half-applied


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b'["user1@example.com", "sent"]\n', id="too-few-fields"),
        pytest.param(b'{"recipient": "user1@example.com"}\n', id="not-a-list"),
        pytest.param(line(("user1@example.com", "bogus", None, None, None, None)), id="unknown-status"),
        pytest.param(line((7, "sent", 250, "ok", None, None)), id="recipient-not-text"),
    ],
)
def test_a_journal_line_of_the_wrong_shape_is_damage_not_a_crash(db_path, bad):
    # Valid JSON that is not an event (a damaged file): the same clear error as a line
    # that is not JSON, with the file kept and nothing applied; not a bare ValueError.
    run_id = new_run(db_path)
    path = write_journal(db_path, run_id, line(sending(1)) + bad + line(sent(1)))
    with SendLog.open(db_path) as log, pytest.raises(SendLogError) as caught:
        recover(log, CAMPAIGN)
    assert "journal of campaign 'news' is damaged" in str(caught.value)
    assert path.exists()
    assert rows(db_path) == {}


def test_a_journal_that_cannot_be_created_is_a_clear_error(db_path, tmp_path):
    run_id = new_run(db_path)
    journal_path(db_path, CAMPAIGN).mkdir()  # something in the way
    with SendLog.open(db_path) as log, pytest.raises(SendLogError) as caught:
        JournalWriter(log, CAMPAIGN, run_id)
    assert "cannot write the delivery journal" in str(caught.value)


# --- a journal that cannot be trusted stops the run; one whose run the log lost is applied


def killed_run_with_journal(db_path: Path) -> Path:
    """A run killed after 10 applied and 5 unapplied sending/sent pairs: its journal."""
    run_id = new_run(db_path)
    kill(start_killed_writer(db_path, run_id, applied_pairs=10, more_pairs=5))
    return journal_path(db_path, CAMPAIGN)


@pytest.mark.parametrize(
    "damage",
    ["emptied", "nul-filled", "header only", "header cut"],
)
def test_a_damaged_journal_stops_the_run_naming_what_is_at_stake(db_path, damage):
    path = killed_run_with_journal(db_path)
    data = path.read_bytes()
    header = data[: data.index(b"\n") + 1]
    path.write_bytes(
        {"emptied": b"", "nul-filled": b"\0" * len(data), "header only": header, "header cut": header[:10]}[damage]
    )
    before = rows(db_path)

    with SendLog.open(db_path) as log, pytest.raises(SendLogError) as caught:
        recover(log, CAMPAIGN)

    assert "cannot be trusted" in caught.value.message
    assert "a second time" in caught.value.hint and "Nothing was sent" in caught.value.hint
    assert path.exists() and rows(db_path) == before


def test_a_journal_whose_run_the_send_log_lost_is_applied_whole(db_path):
    new_run(db_path)
    # Run 7 is not in the send log (its commits went with a deleted -wal file).
    path = write_journal(
        db_path, 7, b"".join(line(e) for n in range(3) for e in (sending(n), sent(n))) + line(sending(9))
    )
    with SendLog.open(db_path) as log:
        assert recover(log, CAMPAIGN) == 7
    assert rows(db_path) == {
        **{f"user{n}@example.com": ("sent", 1) for n in range(3)},
        "user9@example.com": ("sending", 1),
    }
    assert not path.exists()


def test_a_journal_whose_run_the_log_lost_and_that_holds_nothing_is_not_trusted(db_path):
    new_run(db_path)
    path = write_journal(db_path, 7, b"")
    with SendLog.open(db_path) as log, pytest.raises(SendLogError, match="no record of its run 7"):
        recover(log, CAMPAIGN)
    assert path.exists()
