"""`mailer report` with events after sending: bounces, complaints and their rate, opens, clicks per link."""

from __future__ import annotations

import json

import pytest
from send_support import Project
from test_report_html import HOSTILE, assert_self_contained, parse

from mailer.report.engagement import complaint_level
from mailer.store.records import FeedbackEvent, FeedbackKind
from mailer.store.sqlite import SendLog


def sent_campaign(project: Project, count: int) -> None:
    project.write_contacts([f"r{n}@example.com" for n in range(count)])
    assert project.send("--yes").exit_code == 0


def record(project: Project, events: list[tuple[str, FeedbackKind, str | None]]) -> None:
    with SendLog.open(project.log_path, create=False) as log:
        log.record_feedback(FeedbackEvent("news", address, kind, detail=detail) for address, kind, detail in events)


def test_report_counts_unique_events_and_click_through_per_link(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    sent_campaign(project, 4)
    record(
        project,
        [
            ("r0@example.com", FeedbackKind.OPENED, None),
            ("r0@example.com", FeedbackKind.OPENED, None),  # twice: one unique open
            ("r1@example.com", FeedbackKind.OPENED, None),
            ("r0@example.com", FeedbackKind.CLICKED, "https://acme.example/a"),
            ("r0@example.com", FeedbackKind.CLICKED, "https://acme.example/a"),
            ("r1@example.com", FeedbackKind.CLICKED, "https://acme.example/a"),
            ("r1@example.com", FeedbackKind.CLICKED, f"https://acme.example/{HOSTILE}"),
            ("r2@example.com", FeedbackKind.BOUNCED_HARD, "5.1.1"),
            ("r3@example.com", FeedbackKind.BOUNCED_SOFT, "4.2.2"),
            ("r3@example.com", FeedbackKind.UNSUBSCRIBED, None),
        ],
    )

    data = project.report("--campaign", "news")["engagement"]

    assert data["sent"] == 4 and data["unique_opens"] == 2 and data["unique_clicks"] == 2
    assert (data["bounces_hard"], data["bounces_soft"], data["unsubscribes"], data["complaints"]) == (1, 1, 1, 0)
    assert data["complaint_rate"] == 0 and data["complaint_level"] == "ok" and data["opens_inflated"] is True
    assert data["clicks_by_link"][0] == {
        "url": "https://acme.example/a",
        "unique_clicks": 2,
        "clicks": 3,
        "click_through": 0.5,
    }
    text = project.cli("report", "--campaign", "news")
    assert text.exit_code == 0, text
    assert "hard bounces" in text.stdout and "unique opens*" in text.stdout and "Apple Mail Privacy" in text.stdout
    assert "click-through per link" in text.stdout and "50.00 %" in text.stdout
    page_path = tmp_path / "r.html"
    assert project.cli("report", "--campaign", "news", "--html", str(page_path)).exit_code == 0
    raw = page_path.read_text(encoding="utf-8")
    page = parse(raw)
    assert_self_contained(page)
    assert "<script" not in raw and f"https://acme.example/{HOSTILE}" in page.all_text()
    assert "Engagement" in page.all_text() and "Unique clicks per link" in page.svg_titles
    assert "Apple Mail Privacy Protection" in page.all_text()


def test_complaint_rate_above_gmails_limit_is_exit_1_with_a_warning(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    sent_campaign(project, 3)
    record(project, [("r1@example.com", FeedbackKind.COMPLAINED, "abuse")])

    outcome = project.cli("report", "--campaign", "news", "--json")

    assert outcome.exit_code == 1
    data = json.loads(outcome.stdout)["engagement"]
    assert data["complaints"] == 1 and data["complaint_level"] == "fail"
    assert data["complaint_rate"] == pytest.approx(1 / 3)
    assert "complaint rate 33.33 % (1 of 3 sent) is above 0.3 %" in outcome.stderr and "exit 1" in outcome.stderr


@pytest.mark.parametrize(
    ("rate", "level"), [(0.0, "ok"), (0.001, "ok"), (0.0011, "warn"), (0.003, "warn"), (0.0031, "fail")]
)
def test_complaint_levels_are_gmails_numbers(rate, level):
    assert complaint_level(rate) == level
