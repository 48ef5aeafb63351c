"""return_path with {token}: each recipient's envelope sender carries its VERP token
(mailer.core.tokens), in the dry run (as Return-Path) and at the server; the token
resolves through the send log to recipient and campaign, and shows no address."""

from __future__ import annotations

import base64
import json

from send_support import Project, addresses

from mailer.core.tokens import TokenSigner, parse_verp_token, recipient_tag
from mailer.store.sqlite import SendLog

SECRET = "verp-test-secret-0123456789abcdefghij"
ENV = {"MAILER_WEB_SECRET": SECRET}
SIGNER = TokenSigner(SECRET)


def verp_project(tmp_path, server, return_path="bounces+{token}@acme.example") -> Project:
    project = Project(tmp_path, server)
    project.configure(streams={"transactional": {"return_path": return_path}})
    return project


def token_of(sender: str) -> str:
    local = sender.partition("@")[0]
    assert local.startswith("bounces+")
    return local.removeprefix("bounces+")


def assert_unreadable(token: str, address: str) -> None:
    local = address.partition("@")[0]
    forms = [address, local, base64.b64encode(address.encode()).decode().rstrip("=")]
    forms += [base64.b32encode(address.encode()).decode().rstrip("=").lower()]
    assert not any(form.lower() in token.lower() for form in forms), (token, address)


def test_the_dry_run_shows_each_recipients_token_as_return_path(tmp_path, smtp_server):
    project = verp_project(tmp_path, smtp_server)
    project.write_contacts(["Ann.Example@mail.example", "bob@mail.example"])
    outcome = project.send("--dry-run", env=ENV)
    assert outcome.exit_code == 0, outcome
    blocks = [block for block in outcome.stdout.split("\nFrom MAILER-DAEMON") if block.strip()]
    assert len(blocks) == 2
    for block, address in zip(blocks, ["Ann.Example@mail.example", "bob@mail.example"], strict=True):
        head = block.split("\n", 1)[1]  # after the mbox From line
        assert head.startswith("Return-Path: <bounces+"), head[:200]
        sender = head.split("<", 1)[1].split(">", 1)[0]
        token = token_of(sender)
        assert len(token) == 32 and token == token.lower()
        assert parse_verp_token(token)[0] == recipient_tag(address)
        assert SIGNER.resolve_verp(token, [("other", address), ("news", address)]) == ("news", address)
        assert_unreadable(token, address)
    assert smtp_server.connections == 0

    jsonl = project.send("--dry-run", "--format", "jsonl", env=ENV)
    records = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [token_of(r["return_path"]) for r in records] == [
        SIGNER.verp_token("news", "Ann.Example@mail.example"),
        SIGNER.verp_token("news", "bob@mail.example"),
    ]


def test_the_token_at_the_server_resolves_through_the_send_log(tmp_path, smtp_server):
    project = verp_project(tmp_path, smtp_server)
    sent_to = addresses(3) + ["Zoë@mail.example"]
    project.write_contacts(sent_to)
    outcome = project.send("--yes", env=ENV)
    assert outcome.exit_code == 0, outcome
    senders = {message.rcpt_tos[0]: message.mail_from for message in smtp_server.messages}
    assert set(senders) == set(sent_to)
    assert len(set(senders.values())) == 4  # one token per recipient
    with SendLog.open(project.log_path, create=False) as log:
        for address, sender in senders.items():
            assert sender.endswith("@acme.example")
            token = token_of(sender)
            assert_unreadable(token, address)
            tag, _mac = parse_verp_token(token.upper())  # a relay may fold the case
            candidates = log.find_by_recipient_tag(tag)
            assert SIGNER.resolve_verp(token.upper(), candidates) == ("news", address)
            # Another key, or another campaign's rows, do not resolve it.
            assert TokenSigner("another-secret-0123456789abcdefghijkl").resolve_verp(token, candidates) is None
            assert SIGNER.resolve_verp(token, [("other", address)]) is None
    # The From header is untouched: only the envelope changes.
    assert all(b"From: Acme News <news@acme.example>" in message.data for message in smtp_server.messages)


def test_a_fixed_return_path_is_the_envelope_sender_of_every_message(tmp_path, smtp_server):
    project = verp_project(tmp_path, smtp_server, return_path="bounces@acme.example")
    project.write_contacts(addresses(2))
    outcome = project.send("--yes")  # no key needed without {token}
    assert outcome.exit_code == 0, outcome
    assert {message.mail_from for message in smtp_server.messages} == {"bounces@acme.example"}


def test_without_the_signing_key_nothing_is_sent(tmp_path, smtp_server):
    project = verp_project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))
    for extra in (("--yes",), ("--dry-run",)):
        outcome = project.send(*extra, env={"MAILER_WEB_SECRET": ""})
        assert outcome.exit_code == 2, outcome
        assert "MAILER_WEB_SECRET" in outcome.stderr and "Traceback" not in outcome.stderr
    assert smtp_server.connections == 0


def test_without_return_path_the_envelope_sender_is_the_from_address(tmp_path, smtp_server):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(1))
    outcome = project.send("--dry-run")
    assert outcome.exit_code == 0 and "Return-Path" not in outcome.stdout
    assert project.send("--yes").exit_code == 0
    assert smtp_server.messages[0].mail_from == "news@acme.example"
