"""`--where` on `engagement.*`: the history of every campaign in the send log, read once per run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from send_support import Project

from mailer.compose.engagement import EngagementLookup
from mailer.store.records import FeedbackEvent, FeedbackKind
from mailer.store.sqlite import SendLog

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_lookup_counts_and_days_since_with_a_fixed_clock():
    history = {
        "ann@example.com": (
            3,
            2,
            1,
            0,
            "2026-05-22T12:00:00+00:00",
            "2026-01-01T00:00:00+00:00",
            "2026-05-30T08:00:00",
        ),
    }
    lookup = EngagementLookup(history, clock=NOW.timestamp)

    ann = lookup.of("Ann@Example.com")  # one person however the address is written
    assert (ann["sent"], ann["opens"], ann["clicks"], ann["bounces"]) == (3, 2, 1, 0)
    assert ann["days_since_open"] == 10 and ann["days_since_click"] == 151
    assert ann["last_sent"] == datetime(2026, 5, 30, 8, tzinfo=UTC)
    nobody = lookup.of("new@example.com")
    assert nobody["sent"] == 0 and nobody["last_open"] is None and nobody["days_since_open"] is None


def test_dry_run_selects_by_engagement_across_campaigns(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["r0@example.com", "r1@example.com", "r2@example.com"])
    assert project.send("--yes", "--campaign", "spring").exit_code == 0
    now = datetime.now(UTC)
    with SendLog.open(project.log_path, create=False) as log:
        log.record_feedback(
            [
                FeedbackEvent(
                    "spring", "r0@example.com", FeedbackKind.OPENED, at=(now - timedelta(days=10)).isoformat()
                ),
                FeedbackEvent(
                    "spring", "r1@example.com", FeedbackKind.OPENED, at=(now - timedelta(days=200)).isoformat()
                ),
                FeedbackEvent("spring", "r1@example.com", FeedbackKind.BOUNCED_SOFT, ref="b1"),
            ]
        )
    project.write_contacts(["r0@example.com", "r1@example.com", "r2@example.com", "new@example.com"])

    def selected(where: str) -> list[str]:
        outcome = project.send("--dry-run", "--campaign", "summer", "--format", "jsonl", "--where", where)
        assert outcome.exit_code == 0, outcome
        return [json.loads(line)["to"] for line in outcome.stdout.splitlines() if line.strip()]

    assert selected("engagement.days_since_open is not none and engagement.days_since_open < 180") == ["r0@example.com"]
    assert selected("engagement.sent == 0") == ["new@example.com"]
    assert selected("engagement.bounces > 0") == ["r1@example.com"]
    assert selected("engagement.last_open is none and engagement.last_sent is not none") == ["r2@example.com"]


def test_engagement_where_without_a_send_log_sees_no_history(tmp_path):
    project = Project(tmp_path)
    project.write_contacts(["ann@example.com"])
    outcome = project.send("--dry-run", "--format", "jsonl", "--where", "engagement.sent == 0")
    assert outcome.exit_code == 0, outcome
    assert len(outcome.stdout.splitlines()) == 1
    assert not project.log_path.exists()
