"""`mailer bounces` end to end: a real `mailer send` to an aiosmtpd server on loopback,
then bounce and complaint reports about those very messages (their real Message-IDs,
VERP tokens minted by the same key) read from an mbox or a Maildir through the CLI,
on SQLite and on a real PostgreSQL cluster."""

from __future__ import annotations

import email
import json
import mailbox
import os
from pathlib import Path

import bounce_fixtures as fx
import pytest
from send_support import Project, addresses

from mailer.core.config import LogConfig
from mailer.core.tokens import TokenSigner
from mailer.store import open_store

SECRET = "k" * 40
WEB = {"base_url": "https://mail.acme.example", "secret_env": "BOUNCE_TEST_SECRET"}
ENV = {"BOUNCE_TEST_SECRET": SECRET}


def _project(tmp_path: Path, server, store: str, request) -> Project:
    project = Project(tmp_path, server, web=WEB)
    if store == "postgres":
        project.configure(log={"url": request.getfixturevalue("pg_url")})
    return project


def _open(project: Project):
    values = project.sections.get("log", {})
    if "url" in values:
        return open_store(LogConfig(path=project.log_path, url=values["url"]), create=False)
    return open_store(LogConfig(path=project.log_path), create=False)


def _message_ids(project: Project, emails: list[str], campaign: str) -> dict[str, str]:
    """The Message-ID of each address's message as the relay received it (the real
    header of the real send), checked against what the send log indexed."""
    ids: dict[str, str] = {}
    with project.server.lock:
        transactions = list(project.server.messages)
    for transaction in transactions:
        headers = email.message_from_bytes(transaction.data)
        for address in transaction.rcpt_tos:
            if address in emails:
                ids[address] = headers["Message-ID"]
    assert set(ids) == set(emails)
    with _open(project) as log:
        found = log.find_by_message_ids(list(ids.values()))
    assert {mid: (c, address) for mid, (c, address) in found.items()} == {ids[e]: (campaign, e) for e in emails}
    return ids


def _write_mbox(path: Path, messages: list[bytes]) -> Path:
    with path.open("ab") as handle:
        for raw in messages:
            handle.write(
                b"From MAILER-DAEMON Wed Dec  2 14:00:00 2026\n" + raw.replace(b"\nFrom ", b"\n>From ") + b"\n"
            )
    return path


def _bounces(project: Project, *args: str) -> tuple[int, dict, str]:
    outcome = project.cli("bounces", *args, "--json", env=ENV)
    assert outcome.stdout.strip(), outcome
    return outcome.exit_code, json.loads(outcome.stdout), outcome.stderr


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_mbox_reports_about_a_real_send_are_attributed_recorded_and_suppressed(
    smtp_server, tmp_path: Path, store: str, request
) -> None:
    project = _project(tmp_path, smtp_server, store, request)
    emails = addresses(8)
    project.write_contacts(emails)
    sent = project.send("--yes", "--campaign", "dec")
    assert sent.exit_code == 0, sent
    ids = _message_ids(project, emails, "dec")
    signer = TokenSigner(SECRET)
    verp = {e: f"bounces+{signer.verp_token('dec', e)}@acme.example" for e in emails}
    plain = "bounces@acme.example"
    box = _write_mbox(
        tmp_path / "bounces.mbox",
        [
            fx.postfix_dsn(emails[0], ids[emails[0]], plain),  # by Message-ID
            fx.gmail_dsn(emails[1], ids[emails[1]], plain, status="5.7.26"),  # policy: not suppressed
            fx.postfix_delayed(emails[2], "<not-ours@x>", verp[emails[2]]),  # by VERP token
            fx.yahoo_arf(ids[emails[3]], plain),  # complaint, recipient redacted: by Message-ID
            fx.outlook_jmrp(emails[4], "<unknown@hotmail.example>", plain),  # by address alone
            fx.qmail_bounce(emails[5], "<also-unknown@x>", verp[emails[5]]),  # heuristic + VERP
            fx.exchange_ndr(emails[6], ids[emails[6]], plain),
            fx.postfix_dsn("stranger@example.net", "<nope@x>", plain, report_id="<s1@mx>"),  # never mailed
            fx.human_reply(ids[emails[7]]),
            fx.broken_report(),
        ],
    )
    code, summary, stderr = _bounces(project, str(box))
    assert code == 0, stderr
    assert summary["read"] == 10 and summary["reports"] == 8
    assert (summary["hard"], summary["soft"], summary["policy"], summary["complaints"]) == (3, 1, 1, 2)
    assert summary["suppressed"] == 5 and summary["unattributed"] == 1
    assert (summary["foreign"], summary["broken"], summary["duplicates"]) == (1, 1, 0)
    assert "could not be read" in stderr
    with _open(project) as log:
        assert log.suppressed(emails) == [True, False, False, True, True, True, True, False]
        counts = log.feedback_counts("dec")
        assert counts["bounced_hard"] == 3 and counts["bounced_soft"] == 1
        assert counts["complained"] == 2 and counts["bounced_policy"] == 1
        reasons = {s.address: s.reason for s in log.list_suppressions()}
        assert reasons[emails[0]].startswith("hard bounce: 5.1.1")
        assert reasons[emails[3]].startswith("complaint: feedback-type abuse")
        events = {(r, k) for _c, r, k, _at, _d, source in log.list_feedback("dec") if source == "bounces"}
        assert (emails[2], "bounced_soft") in events and (emails[5], "bounced_hard") in events

    # Idempotence: the same mbox again counts nothing new.
    code, again, _ = _bounces(project, str(box))
    assert code == 0
    assert again["reports"] == 8 and again["duplicates"] == 7
    assert (again["hard"], again["soft"], again["policy"], again["complaints"], again["suppressed"]) == (0, 0, 0, 0, 0)
    with _open(project) as log:
        assert log.feedback_counts("dec")["bounced_hard"] == 3


def test_maildir_end_to_end_marks_seen_and_table_output(smtp_server, tmp_path: Path) -> None:
    project = Project(tmp_path, smtp_server)  # no [web]: VERP is not used, Message-IDs are
    emails = addresses(3)
    project.write_contacts(emails)
    assert project.send("--yes").exit_code == 0
    ids = _message_ids(project, emails, "news")
    root = tmp_path / "Maildir"
    box = mailbox.Maildir(root, create=True)
    for address in emails[:2]:
        box.add(mailbox.MaildirMessage(fx.gmail_dsn(address, ids[address], "bounces@acme.example")))
    box.add(mailbox.MaildirMessage(fx.human_reply(ids[emails[2]])))
    outcome = project.cli("bounces", str(root), "--mark-seen")
    assert outcome.exit_code == 0, outcome
    lines = dict(line.split(" ", 1) for line in outcome.stdout.splitlines())
    assert lines["hard"] == "2" and lines["foreign"] == "1" and lines["suppressed"] == "2"
    # the two reports moved to cur/ with S; the human reply stays in new/
    assert len(os.listdir(root / "new")) == 1
    assert sorted(name.rsplit(":", 1)[1] for name in os.listdir(root / "cur")) == ["2,S", "2,S"]
    again = project.cli("bounces", str(root), "--json")
    assert json.loads(again.stdout)["duplicates"] == 2


def _send_campaign(project: Project, campaign: str, emails: list[str]) -> dict[str, str]:
    with project.server.lock:
        project.server.messages.clear()
    outcome = project.send("--yes", "--campaign", campaign)
    assert outcome.exit_code == 0, outcome
    return _message_ids(project, emails, campaign)


def test_soft_bounces_in_three_campaigns_in_a_row_suppress_and_a_clean_campaign_breaks_the_streak(
    smtp_server, tmp_path: Path
) -> None:
    project = Project(tmp_path, smtp_server)
    steady, broken = "steady@example.com", "broken@example.com"
    project.write_contacts([steady, broken])
    box = tmp_path / "b.mbox"
    for number in range(1, 5):
        # steady@ is suppressed after c3: c4 mails only broken@
        ids = _send_campaign(project, f"c{number}", [steady, broken] if number < 4 else [broken])
        reports = [fx.postfix_delayed(steady, ids.get(steady, "<gone@x>"), "bounces@acme.example")]
        if number != 2:  # c2 reached broken@ without a bounce
            reports.append(
                fx.postfix_delayed(broken, ids[broken], "bounces@acme.example").replace(
                    b"Message-Id: <", b"Message-Id: <b" + str(number).encode()
                )
            )
        reports[0] = reports[0].replace(b"Message-Id: <", b"Message-Id: <s" + str(number).encode())
        # a second delay notice for the same message: one campaign, not two
        if number == 1:
            reports.append(reports[0].replace(b"Message-Id: <s1", b"Message-Id: <s1again"))
        box.write_bytes(b"")
        _write_mbox(box, reports)
        code, summary, _ = _bounces(project, str(box))
        assert code == 0
        with _open(project) as log:
            suppressed = dict(zip([steady, broken], log.suppressed([steady, broken])))
        if number < 3:
            assert suppressed == {steady: False, broken: False}, number
        if number == 3:
            assert summary["soft_streaks"] == 1 and suppressed == {steady: True, broken: False}
        if number == 4:
            assert suppressed[broken] is False  # c3, c4 only: the clean c2 broke the streak
    with _open(project) as log:
        reason = {s.address: s.reason for s in log.list_suppressions()}[steady]
    assert reason.startswith("soft bounces in 3 campaigns in a row")


def test_soft_bounce_limit_comes_from_the_config(smtp_server, tmp_path: Path) -> None:
    project = Project(tmp_path, smtp_server, bounces={"soft_bounce_limit": 1})
    project.write_contacts(["one@example.com"])
    ids = _send_campaign(project, "c1", ["one@example.com"])
    box = _write_mbox(tmp_path / "b.mbox", [fx.postfix_delayed("one@example.com", ids["one@example.com"], "b@x")])
    code, summary, _ = _bounces(project, str(box))
    assert code == 0 and summary["suppressed"] == 1 and summary["soft_streaks"] == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.mbox"], "missing.mbox: no such file or directory"),
        (["."], "not a Maildir folder"),
        (["ftp://host/x"], "unknown kind of source"),
        (["box.mbox", "--since", "yesterday"], "--since 'yesterday' is not a day"),
        (["box.mbox", "--move-to", "Done"], "cannot change it"),
    ],
)
def test_bad_usage_is_exit_2_with_a_clear_message(tmp_path: Path, args: list[str], expected: str) -> None:
    project = Project(tmp_path)
    _write_mbox(tmp_path / "box.mbox", [fx.human_reply("<x@y>")])
    outcome = project.cli("bounces", *[str(tmp_path / a) if a.endswith(".mbox") else a for a in args])
    assert outcome.exit_code == 2, outcome
    assert expected in outcome.stderr
    assert outcome.stdout == ""
    assert not project.log_path.exists() or "missing" not in args[0]


def test_bad_soft_bounce_limit_is_a_config_error(tmp_path: Path) -> None:
    project = Project(tmp_path, bounces={"soft_bounce_limit": 0})
    _write_mbox(tmp_path / "box.mbox", [fx.human_reply("<x@y>")])
    outcome = project.cli("bounces", str(tmp_path / "box.mbox"))
    assert outcome.exit_code == 2
    assert "bounces.soft_bounce_limit" in outcome.stderr


def test_bounces_recorded_while_a_real_send_runs(smtp_server, tmp_path: Path) -> None:
    # A real `mailer send` process writes its batches while a real `mailer bounces`
    # process records 400 hard bounces of an earlier campaign: nothing lost, no "locked".
    project = Project(tmp_path, smtp_server)
    first = addresses(400, prefix="old")
    project.write_contacts(first)
    ids = _send_campaign(project, "earlier", first)
    box = _write_mbox(
        tmp_path / "b.mbox",
        [
            fx.postfix_dsn(e, ids[e], "bounces@acme.example", report_id=f"<r{n}@mx1.acme.example>")
            for n, e in enumerate(first)
        ],
    )
    project.configure(send={"connections": 4, "rate": "500/s"})
    project.write_contacts(addresses(2500, prefix="new"))
    from send_support import wait_for

    sender = project.spawn_send("--yes", "--json", "--campaign", "later")
    try:
        wait_for(lambda: "sent" in project.peek_statuses("later").values(), timeout=60)
        outcome = project.run("bounces", str(box), "--json", timeout=300)
        still_sending = sender.poll() is None
        stdout, stderr = sender.communicate(timeout=300)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert outcome.exit_code == 0, outcome
    assert "locked" not in outcome.stderr and "locked" not in stderr
    summary = json.loads(outcome.stdout)
    assert summary["hard"] == 400 and summary["suppressed"] == 400
    assert json.loads(stdout)["counts"]["rows"] == 2500
    with _open(project) as log:
        assert sum(log.suppressed(first)) == 400
        assert log.feedback_counts("earlier")["bounced_hard"] == 400
    assert still_sending, "the send finished before the bounces were recorded: they did not overlap"
