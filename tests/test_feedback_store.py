"""Events after sending in the store (schema 5): record_feedback, its suppressions and
idempotency, the VERP and Message-ID lookups, the migration from schema 4, and writes
from other processes while a real `mailer send` of the same campaign runs."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from send_support import Project, addresses, wait_for

from mailer.core.outcomes import Status
from mailer.core.tokens import TokenSigner, recipient_tag
from mailer.store.migrations import MIGRATIONS, SCHEMA_VERSION
from mailer.store.records import FeedbackEvent, FeedbackKind, SkippedRow
from mailer.store.sqlite import SendLog

SECRET = "s" * 40


@pytest.fixture
def log(tmp_path: Path):
    with SendLog.open(tmp_path / "log.sqlite3") as opened:
        yield opened


def test_feedback_is_recorded_with_its_suppression_in_one_write(log: SendLog) -> None:
    added = log.record_feedback(
        [FeedbackEvent("spring", "Jane@Example.com", FeedbackKind.UNSUBSCRIBED, source="web")],
        suppress=[("Jane@Example.com", "unsubscribe", "web")],
    )
    assert added == 1
    assert log.suppressed(["jane@example.com"]) == [True]
    (suppression,) = list(log.list_suppressions())
    assert (suppression.address, suppression.reason, suppression.source) == ("jane@example.com", "unsubscribe", "web")
    ((campaign, recipient, kind, at, detail, source),) = log.list_feedback("spring")
    assert (campaign, recipient, kind, detail, source) == ("spring", "jane@example.com", "unsubscribed", None, "web")
    assert at.endswith("+00:00")
    # A second unsubscribe (the page's form after a one-click) is another event, and the
    # suppression stays as it was.
    log.record_feedback(
        [FeedbackEvent("spring", "jane@example.com", FeedbackKind.UNSUBSCRIBED)],
        suppress=[("jane@example.com", "unsubscribe", "web")],
    )
    assert len(list(log.list_suppressions())) == 1


def test_counts_by_kind_and_unique_recipients(log: SendLog) -> None:
    log.record_feedback(
        [
            FeedbackEvent("spring", "a@x.example", FeedbackKind.OPENED),
            FeedbackEvent("spring", "A@x.example", FeedbackKind.OPENED),
            FeedbackEvent("spring", "b@x.example", FeedbackKind.OPENED),
            FeedbackEvent("spring", "a@x.example", FeedbackKind.CLICKED, detail="https://shop.example/"),
            FeedbackEvent("autumn", "a@x.example", FeedbackKind.OPENED),
        ]
    )
    counts = log.feedback_counts("spring")
    assert counts["opened"] == 3 and counts["unique_opened"] == 2
    assert counts["clicked"] == 1 and counts["unique_clicked"] == 1
    assert counts["complained"] == 0 and counts["bounced_hard"] == 0
    assert log.feedback_counts()["opened"] == 4
    assert log.list_feedback("spring")[3][4] == "https://shop.example/"


def test_an_event_with_a_ref_counts_once(log: SendLog) -> None:
    bounce = FeedbackEvent(
        "spring", "a@x.example", FeedbackKind.BOUNCED_HARD, detail="5.1.1 no such user", source="bounces", ref="<b1@mx>"
    )
    assert log.record_feedback([bounce], suppress=[("a@x.example", "5.1.1 no such user", "bounce")]) == 1
    assert log.record_feedback([bounce, bounce]) == 0
    other = FeedbackEvent("spring", "b@x.example", FeedbackKind.BOUNCED_HARD, source="bounces", ref="<b2@mx>")
    assert log.record_feedback([bounce, other]) == 1
    assert log.feedback_counts("spring")["bounced_hard"] == 2


def test_bad_kind_or_source_is_refused_before_anything_is_written(log: SendLog) -> None:
    with pytest.raises(ValueError):
        log.record_feedback([FeedbackEvent("spring", "a@x.example", "liked")])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        log.record_feedback(
            [FeedbackEvent("spring", "a@x.example", FeedbackKind.OPENED)], suppress=[("a@x.example", None, "nope")]
        )
    assert log.list_feedback() == []


def test_verp_token_resolves_through_the_send_log(log: SendLog) -> None:
    signer = TokenSigner(SECRET)
    log.record_events("spring", [("Jane@Example.com", Status.SENDING, None, None, "<m1@acme.example>", 1)])
    log.record_events("spring", [("Jane@Example.com", Status.SENT, 250, "ok", "<m1@acme.example>", None)])
    log.record_events("autumn", [("jane@example.com", Status.SENDING, None, None, "<m2@acme.example>", 1)])
    log.record_events("spring", [("john@example.com", Status.SENDING, None, None, "<m3@acme.example>", 2)])
    token = signer.verp_token("spring", "jane@example.com")
    tag = recipient_tag("jane@example.com")
    candidates = log.find_by_recipient_tag(tag)
    assert sorted(candidates) == [("autumn", "jane@example.com"), ("spring", "Jane@Example.com")]
    assert signer.resolve_verp(token, candidates) == ("spring", "Jane@Example.com")
    assert signer.resolve_verp(signer.verp_token("autumn", "jane@example.com"), candidates)[0] == "autumn"
    assert log.find_by_recipient_tag(recipient_tag("nobody@example.com")) == []


def test_message_ids_are_found_with_or_without_brackets(log: SendLog) -> None:
    log.record_events(
        "spring",
        [
            ("a@x.example", Status.SENDING, None, None, "<m1@acme.example>", 1),
            ("b@x.example", Status.SENDING, None, None, "<m2@acme.example>", 2),
        ],
    )
    found = log.find_by_message_ids(["<m1@acme.example>", " m2@acme.example ", "<unknown@x>", ""])
    assert found == {"<m1@acme.example>": ("spring", "a@x.example"), " m2@acme.example ": ("spring", "b@x.example")}
    with log._guard as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT campaign FROM deliveries WHERE message_id IN (?)", ("<m1@acme.example>",)
        ).fetchall()
        tag_plan = conn.execute("EXPLAIN QUERY PLAN SELECT campaign FROM deliveries WHERE recipient_tag = ?", (1,))
        assert "deliveries_recipient_tag" in str(tag_plan.fetchall())
    assert "deliveries_message_id" in str(plan)


def test_a_suppressed_row_that_is_later_mailed_keeps_its_tag(log: SendLog) -> None:
    log.record_skipped("spring", [SkippedRow("c@x.example", Status.SUPPRESSED, "was suppressed", 3)])
    log.record_events("spring", [("c@x.example", Status.SENDING, None, None, "<m@x>", 3)])
    assert log.find_by_recipient_tag(recipient_tag("c@x.example")) == [("spring", "c@x.example")]


def test_engagement_history_over_all_campaigns_in_one_query(log: SendLog) -> None:
    log.record_events(
        "a", [("Ann@x.org", Status.SENT, 250, "ok", "<1@x>", 1), ("bo@x.org", Status.FAILED, 550, "no", None, 2)]
    )
    log.record_events("b", [("ann@x.org", Status.SENT, 250, "ok", "<2@x>", 1)])
    log.record_feedback(
        [
            FeedbackEvent("a", "ann@x.org", FeedbackKind.OPENED, at="2026-05-01T10:00:00+00:00"),
            FeedbackEvent("b", "ann@x.org", FeedbackKind.OPENED, at="2026-05-03T10:00:00+00:00"),
            FeedbackEvent(
                "b", "ann@x.org", FeedbackKind.CLICKED, detail="https://x.org/", at="2026-05-02T10:00:00+00:00"
            ),
            FeedbackEvent("a", "bo@x.org", FeedbackKind.BOUNCED_HARD, ref="r1"),
        ]
    )

    history = log.engagement_history()

    sent, opens, clicks, bounces, last_open, last_click, last_sent = history["ann@x.org"]
    assert (sent, opens, clicks, bounces) == (2, 2, 1, 0)
    assert last_open is not None and last_open.startswith("2026-05-03")
    assert last_click is not None and last_click.startswith("2026-05-02") and last_sent is not None
    assert history["bo@x.org"][:4] == (0, 0, 0, 1) and history["bo@x.org"][6] is None


def test_a_version_4_log_migrates_with_tags_and_an_empty_feedback_table(tmp_path: Path) -> None:
    path = tmp_path / "v4.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("mailer_address_key", 1, lambda value: value)
    for step in MIGRATIONS[:4]:
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(
        "INSERT INTO deliveries (campaign, recipient, address, domain, status, message_id, first_at, updated_at) "
        "VALUES ('news', 'ann@example.com', 'Ann@example.com', 'example.com', 'sent', '<old@x>', 't0', 't0'), "
        "('news', 'line 7', NULL, '', 'invalid', NULL, 't0', 't0')"
    )
    conn.close()
    with SendLog.open(path) as log:
        assert log.schema_version == SCHEMA_VERSION
        assert log.find_by_recipient_tag(recipient_tag("ann@example.com")) == [("news", "Ann@example.com")]
        assert log.find_by_message_ids(["<old@x>"]) == {"<old@x>": ("news", "Ann@example.com")}
        assert log.feedback_counts()["unsubscribed"] == 0


def test_feedback_writes_while_a_real_send_of_the_same_campaign_runs(smtp_server, tmp_path: Path) -> None:
    # A real `mailer send` process commits its batches to the log while four writers,
    # each with its own connection (as `mailer serve` workers and `mailer bounces` have),
    # record unsubscribes of the same campaign's recipients: nothing lost, no error.
    project = Project(tmp_path, smtp_server)
    # 600/s: the send lasts about five seconds, well past the writers' few hundred commits.
    project.configure(send={"connections": 4, "rate": "600/s"})
    emails = addresses(3000)
    project.write_contacts(emails)
    project.write_template("Subject: News\n\nHello {{ name }}\n", name="news.txt.j2")
    process = project.spawn_send("--yes", "--json", "--campaign", "spring")
    errors: list[BaseException] = []
    try:
        wait_for(lambda: project.log_path.exists() and "sent" in project.peek_statuses("spring").values(), timeout=30)

        def unsubscribe(chunk: list[str]) -> None:
            try:
                with SendLog.open(project.log_path, create=False) as writer:
                    for email in chunk:
                        writer.record_feedback(
                            [FeedbackEvent("spring", email, FeedbackKind.UNSUBSCRIBED)],
                            suppress=[(email, "unsubscribe", "web")],
                        )
            except BaseException as exc:
                errors.append(exc)

        targets = emails[::10]
        threads = [threading.Thread(target=unsubscribe, args=(targets[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        still_sending = process.poll() is None
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert errors == []
    assert process.returncode in (0, 1), stderr
    assert "locked" not in stderr
    summary = json.loads(stdout)
    assert summary["counts"]["rows"] == 3000
    with SendLog.open(project.log_path, create=False) as log:
        assert log.feedback_counts("spring")["unique_unsubscribed"] == len(targets)
        assert sum(log.suppressed(targets)) == len(targets)
        statuses = log.statuses("spring", emails)
    # Every recipient has an outcome: sent, or suppressed when the unsubscribe came first.
    assert all(status in (Status.SENT, Status.SUPPRESSED) for status in statuses)
    assert still_sending, "the writers finished after the send: they did not overlap it"
