"""`mailer bounces` and VERP end to end: a real `mailer send` through a stream whose
`return_path` carries `{token}` to an aiosmtpd server on loopback; a DSN addressed to
the envelope sender that server saw, and nothing else that names the recipient, is
attributed by the token alone. And the warning when the [web] key cannot check tokens."""

from __future__ import annotations

import json
from pathlib import Path

from send_support import Project, addresses

from mailer.store.sqlite import SendLog

SECRET = "verp-bounce-secret-0123456789abcdefghij"
WEB = {"base_url": "https://mail.example.org", "secret_env": "VERP_BOUNCE_SECRET"}
ENV = {"VERP_BOUNCE_SECRET": SECRET}
STREAMS = {"transactional": {"return_path": "bounces+{token}@example.org"}}


def _dsn(envelope_sender: str) -> bytes:
    """A Postfix-style DSN sent to ``envelope_sender``: its own Message-ID, no returned
    original (so no original Message-ID or Return-Path) and a Final-Recipient that
    mailer never wrote to (a forward), so only the token can say whom it is about."""
    return f"""Return-Path: <>
From: MAILER-DAEMON@mx.forwarder.example (Mail Delivery System)
To: {envelope_sender}
Subject: Undelivered Mail Returned to Sender
Date: Wed, 2 Dec 2026 15:00:00 +0000
Message-ID: <20261202150000.VERP1@mx.forwarder.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="verp-bnd"

--verp-bnd
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered to <forwarded-to@elsewhere.example>.

--verp-bnd
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.forwarder.example

Final-Recipient: rfc822; forwarded-to@elsewhere.example
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <forwarded-to@elsewhere.example>: Recipient address rejected: User unknown

--verp-bnd--
""".encode()


def _senders(server) -> dict[str, str]:
    """recipient -> the MAIL FROM the server saw for it (one message per recipient)."""
    with server.lock:
        return {address: message.mail_from for message in server.messages for address in message.rcpt_tos}


def test_a_dsn_to_the_real_verp_sender_is_attributed_by_its_token(smtp_server, tmp_path: Path) -> None:
    project = Project(tmp_path, smtp_server, web=WEB, streams=STREAMS)
    emails = addresses(3)
    project.write_contacts(emails)
    first = project.send("--yes", "--campaign", "oct", env=ENV)
    assert first.exit_code == 0, first
    senders = _senders(smtp_server)
    assert set(senders) == set(emails)
    target = emails[1]
    sender = senders[target]
    assert sender.startswith("bounces+") and sender.endswith("@example.org") and len(set(senders.values())) == 3
    # A later campaign to the same people: the fallback "latest send" would pick it.
    with smtp_server.lock:
        smtp_server.messages.clear()
    second = project.send("--yes", "--campaign", "dec", env=ENV)
    assert second.exit_code == 0, second
    assert _senders(smtp_server)[target] != sender  # another campaign, another token

    box = tmp_path / "bounces.mbox"
    box.write_bytes(b"From MAILER-DAEMON Wed Dec  2 15:00:00 2026\n" + _dsn(sender) + b"\n")
    outcome = project.cli("bounces", str(box), "--json", env=ENV)
    assert outcome.exit_code == 0, outcome
    assert "VERP_BOUNCE_SECRET" not in outcome.stderr  # the key was there and valid: no warning
    summary = json.loads(outcome.stdout)
    assert (summary["reports"], summary["hard"], summary["suppressed"], summary["unattributed"]) == (1, 1, 1, 0)
    with SendLog.open(project.log_path, create=False) as log:
        assert log.suppressed(emails) == [False, True, False]
        assert log.suppressed(["forwarded-to@elsewhere.example"]) == [False]
        feedback = {
            campaign: [(r, k) for _c, r, k, _at, _d, source in log.list_feedback(campaign) if source == "bounces"]
            for campaign in ("oct", "dec")
        }
        reasons = {s.address: s.reason for s in log.list_suppressions()}
    assert feedback == {"oct": [(target, "bounced_hard")], "dec": []}
    assert reasons[target].startswith("hard bounce: 5.1.1")


def test_an_invalid_key_is_named_in_the_warning_never_shown(tmp_path: Path) -> None:
    project = Project(tmp_path, web=WEB)
    box = tmp_path / "bounces.mbox"
    box.write_bytes(b"From MAILER-DAEMON Wed Dec  2 15:00:00 2026\n" + _dsn("bounces+x@example.org") + b"\n")
    short = "sh0rt-key-xyzzy"
    outcome = project.cli("bounces", str(box), "--json", env={"VERP_BOUNCE_SECRET": short})
    assert outcome.exit_code == 0, outcome
    assert "the web signing key in VERP_BOUNCE_SECRET is too short (15 characters; at least" in outcome.stderr
    assert "not set" not in outcome.stderr
    assert short not in outcome.stderr and short not in outcome.stdout
    unset = project.cli("bounces", str(box), "--json", env={"VERP_BOUNCE_SECRET": None})
    assert unset.exit_code == 0, unset
    assert "VERP_BOUNCE_SECRET is not set: VERP tokens are matched by address only" in unset.stderr
