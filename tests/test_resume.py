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
        decide = {a: Resume(log, "news", resend_unknown=False).settled_by(contact(a)) for a in addresses}
        assert decide == {
            "sent@example.com": Skip.ALREADY_DONE,
            "later@example.com": None,
            "unknown@example.com": Skip.UNKNOWN,
            "gone@example.com": Skip.SUPPRESSED,
            "new@example.com": None,
        }
        assert Resume(log, "news", resend_unknown=True).settled_by(contact("unknown@example.com")) is None
        assert Resume(log, "other", resend_unknown=False).settled_by(contact("sent@example.com")) is None
