"""Tests of mailer.send.resume: the one resume rule, on its own and from a real send log."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailer.compose.contacts import Contact
from mailer.core.outcomes import Skip, Status
from mailer.send.resume import Resume, resume_rule
from mailer.store.sqlite import SendLog


@pytest.mark.parametrize(
    ("status", "resend_unknown", "expected"),
    [
        (None, False, None),
        (Status.DEFERRED, False, None),
        (Status.INVALID, False, None),  # the row may be fixed now
        (Status.SUPPRESSED, False, None),  # it may be off the list now
        (Status.SENDING, False, Skip.UNKNOWN),
        (Status.SENDING, True, None),
        (Status.SENT, True, Skip.ALREADY_DONE),
        (Status.FAILED, True, Skip.ALREADY_DONE),
    ],
)
def test_the_resume_rule_by_logged_status(status: Status | None, resend_unknown: bool, expected: Skip | None) -> None:
    assert resume_rule(status, suppressed=False, resend_unknown=resend_unknown) is expected


@pytest.mark.parametrize("status", [None, Status.DEFERRED, Status.INVALID, Status.SUPPRESSED])
def test_the_suppression_list_settles_what_the_log_leaves_open(status: Status | None) -> None:
    assert resume_rule(status, suppressed=True, resend_unknown=False) is Skip.SUPPRESSED


def test_an_earlier_outcome_counts_before_the_suppression_list() -> None:
    assert resume_rule(Status.SENT, suppressed=True, resend_unknown=False) is Skip.ALREADY_DONE
    assert resume_rule(Status.SENDING, suppressed=True, resend_unknown=False) is Skip.UNKNOWN


def contact(address: str, line: int = 2) -> Contact:
    return Contact(line=line, email=address, envelope=address, smtputf8=False, variables={"email": address})


def test_resume_decisions_from_a_real_send_log(tmp_path: Path) -> None:
    with SendLog.open(tmp_path / "mailer.sqlite3") as log:
        log.record_events(
            "news",
            [
                ("sent@example.com", Status.SENT, 250, "ok", "<s@x>", 2),
                ("later@example.com", Status.DEFERRED, 451, "later", "<l@x>", 3),
                ("unknown@example.com", Status.SENDING, None, None, "<u@x>", 4),
            ],
        )
        log.add_suppressions(["gone@example.com"])
        addresses = [
            "sent@example.com",
            "later@example.com",
            "unknown@example.com",
            "gone@example.com",
            "new@example.com",
        ]
        contacts = [contact(a, line) for line, a in enumerate(addresses, 2)]
        expected = [Skip.ALREADY_DONE, None, Skip.UNKNOWN, Skip.SUPPRESSED, None]
        assert Resume(log, "news", resend_unknown=False).classify(contacts) == expected
        # In batches of two, through settle(): the same answers, each with its contact.
        settled = list(Resume(log, "news", resend_unknown=False, batch=2).settle(iter(contacts)))
        assert settled == list(zip(contacts, expected))
        assert Resume(log, "news", resend_unknown=True).classify(contacts)[2] is None
        assert Resume(log, "other", resend_unknown=False).classify(contacts[:1]) == [None]


def test_the_store_is_asked_once_per_batch_not_once_per_contact(tmp_path: Path) -> None:
    with SendLog.open(tmp_path / "mailer.sqlite3") as log:
        log.record_events(
            "news", [(f"user{i}@example.com", Status.SENT, 250, "ok", None, i) for i in range(0, 1200, 3)]
        )
        log.add_suppressions([f"user{i}@example.com" for i in range(1, 1200, 3)])
        queries: list[str] = []
        assert log._conn is not None
        log._conn.set_trace_callback(queries.append)
        contacts = [contact(f"user{i}@example.com", i + 2) for i in range(1200)]
        decisions = [skip for _contact, skip in Resume(log, "news", resend_unknown=False).settle(iter(contacts))]
        log._conn.set_trace_callback(None)
    assert decisions == [(Skip.ALREADY_DONE, Skip.SUPPRESSED, None)[i % 3] for i in range(1200)]
    # 1,200 contacts in batches of 500: three batches, one status and one suppression query each.
    assert len([q for q in queries if q.lstrip().startswith("SELECT")]) == 6
