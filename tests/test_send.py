"""End-to-end tests of a real `mailer send`: CLI -> campaign -> pool -> loopback SMTP server -> send log.

Every test drives the real command (CliRunner, or a subprocess where real streams
matter) with real files in tmp_path and the fixture server from smtp_fixtures.py, and
checks the exit code, the message, what the server received and the send log.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from send_support import MAILER, Project, addresses, received_addresses
from smtp_fixtures import TEST_USERNAME

import mailer.cli.output


def rcpt_connections(server, address: str) -> list[int]:
    """The connection of every RCPT TO the server saw for ``address``, in order."""
    with server.lock:
        return [connection for connection, rcpt in server.rcpt_attempts if rcpt == address]


def clear_faults(server) -> None:
    with server.lock:
        server.faults.clear()


def assert_consistent(project: Project, server, emails: list[str], campaign: str = "news") -> dict[str, str]:
    """Every recipient has exactly one status, nobody got two copies, and the log's
    `sent` rows are exactly the addresses the server accepted."""
    statuses = project.statuses(campaign)
    assert set(statuses) == set(emails)
    received = Counter(received_addresses(server))
    assert not [a for a, n in received.items() if n > 1], f"duplicates: {received}"
    assert {a for a, s in statuses.items() if s == "sent"} == set(received)
    return statuses


# ---------------------------------------------------------------- happy path


def test_send_delivers_each_contact_once_logs_sent_and_a_rerun_sends_nothing(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(6)
    project.write_contacts(emails)

    first = project.send("--yes", "--json")

    assert first.exit_code == 0, first
    summary = json.loads(first.stdout)
    assert summary["counts"]["sent"] == 6 and summary["counts"]["rows"] == 6
    assert (summary["campaign"], summary["dry_run"], summary["exit_code"]) == ("news", False, 0)
    assert "sent 6" in first.stderr
    assert sorted(received_addresses(smtp_server)) == emails
    for message in smtp_server.messages:
        name = message.rcpt_tos[0].split("@")[0]
        assert f"Subject: News for {name}".encode() in message.data
        assert f"Hello {name},".encode() in message.data
        assert message.mail_from == "news@acme.example"
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}
    assert all(project.delivery(e).attempts == 1 and project.delivery(e).smtp_code == 250 for e in emails)

    again = project.send("--yes")

    assert again.exit_code == 0, again
    assert again.stdout == ""  # stdout carries only the product (--json here was not asked)
    assert "already settled in an earlier run 6" in again.stderr
    assert len(smtp_server.messages) == 6


def test_addresses_that_differ_by_case_only_get_one_message(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["good@example.org", "GOOD@EXAMPLE.ORG", "Good@Example.org"])

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 0, outcome
    assert json.loads(outcome.stdout)["counts"]["duplicate"] == 2
    assert received_addresses(smtp_server) == ["good@example.org"]


def test_a_rerun_with_the_address_in_another_case_mails_nobody_twice(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["Jane.Doe@example.org", "ömer@example.org"])
    assert project.send("--yes").exit_code == 0
    project.write_contacts(["jane.doe@EXAMPLE.ORG", "ÖMER@example.org", "new@example.org"])

    again = project.send("--yes", "--json")

    assert again.exit_code == 0, again
    counts = json.loads(again.stdout)["counts"]
    assert (counts["already_done"], counts["sent"]) == (2, 1), counts
    assert Counter(received_addresses(smtp_server)) == Counter(
        ["Jane.Doe@example.org", "ömer@example.org", "new@example.org"]
    )


def test_json_summary_is_the_only_thing_on_stdout(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2) + ["broken-address"])

    outcome = project.run("send", str(project.contacts_path), str(project.template_path), "--json", "--yes")

    assert outcome.exit_code == 1, outcome
    summary = json.loads(outcome.stdout)  # one JSON object, nothing else
    assert summary["counts"]["sent"] == 2 and summary["counts"]["invalid"] == 1
    assert summary["problems"][0]["line"] == 4 and summary["problems"][0]["kind"] == "invalid"
    assert "contacts.csv:4" in outcome.stderr


# ---------------------------------------------------------------- faults


def test_451_at_rcpt_once_is_retried_and_delivered_once(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(4)
    project.write_contacts(emails)
    fault = smtp_server.set_fault(emails[1], "rcpt", "451 4.7.1 greylisted, come back later", times=1)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert fault.hits == 1
    assert len(rcpt_connections(smtp_server, emails[1])) == 2
    statuses = assert_consistent(project, smtp_server, emails)
    assert set(statuses.values()) == {"sent"}
    row = project.delivery(emails[1])
    assert (row.attempts, row.smtp_code) == (2, 250)


def test_451_forever_defers_exits_75_and_a_rerun_sends_exactly_those(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(5)
    project.write_contacts(emails)
    smtp_server.set_fault(emails[2], "rcpt", "451 4.3.0 mailbox busy")
    smtp_server.set_fault(emails[4], "rcpt", "450 4.2.1 try again later")

    first = project.send("--yes", "--json")

    assert first.exit_code == 75, first
    assert "deferred (will retry next run) 2" in first.stderr
    counts = json.loads(first.stdout)["counts"]
    assert (counts["sent"], counts["deferred"]) == (3, 2)
    statuses = assert_consistent(project, smtp_server, emails)
    assert statuses[emails[2]] == statuses[emails[4]] == "deferred"
    # retries = 2 in the config: three attempts, then the run gives up on them.
    assert len(rcpt_connections(smtp_server, emails[2])) == 3
    row = project.delivery(emails[2])
    assert (row.status, row.attempts, row.smtp_code) == ("deferred", 3, 451)
    assert "mailbox busy" in row.smtp_reply

    clear_faults(smtp_server)
    before = len(smtp_server.messages)
    second = project.send("--yes", "--json")

    assert second.exit_code == 0, second
    counts = json.loads(second.stdout)["counts"]
    assert (counts["sent"], counts["already_done"]) == (2, 3)
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages[before:]) == [emails[2], emails[4]]
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}


def test_550_user_unknown_fails_once_is_suppressed_and_skipped_by_the_next_campaign(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(4)
    project.write_contacts(emails)
    smtp_server.set_fault(
        emails[0], "rcpt", "550 5.1.1 <user000@example.com>: Recipient address rejected: User unknown"
    )

    outcome = project.send("--yes")

    assert outcome.exit_code == 1, outcome
    assert "failed (permanent) 1" in outcome.stderr
    assert len(rcpt_connections(smtp_server, emails[0])) == 1  # never retried
    statuses = assert_consistent(project, smtp_server, emails)
    assert statuses[emails[0]] == "failed"
    row = project.delivery(emails[0])
    assert (row.attempts, row.smtp_code) == (1, 550)

    listing = project.cli("suppress", "list")
    assert listing.exit_code == 0, listing
    lines = listing.stdout.splitlines()
    assert lines[0] == "email,reason,source,added_at"
    assert len(lines) == 2 and lines[1].startswith(f"{emails[0]},550 5.1.1") and ",bounce," in lines[1]

    later = project.send("--yes", "--campaign", "later", "--json")

    assert later.exit_code == 0, later
    counts = json.loads(later.stdout)["counts"]
    assert (counts["sent"], counts["suppressed"]) == (3, 1)
    assert project.statuses("later")[emails[0]] == "suppressed"
    assert len(smtp_server.received_by(emails[0])) == 0
    assert len(rcpt_connections(smtp_server, emails[0])) == 1


def test_send_and_suppress_agree_on_which_addresses_are_valid(smtp_server, tmp_path):
    # A hard bounce puts the recipient on the suppression list in the middle of a run:
    # an address send accepts but the suppression list refuses would end the run there.
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@corp.local", "bob@example.com"])
    smtp_server.set_fault("bob@example.com", "rcpt", "550 5.1.1 user unknown")

    outcome = project.send("--yes")

    assert outcome.exit_code == 1, outcome
    assert project.statuses() == {"ann@corp.local": "invalid", "bob@example.com": "failed"}
    assert rcpt_connections(smtp_server, "ann@corp.local") == []
    assert "bob@example.com,550 5.1.1 user unknown,bounce," in project.cli("suppress", "list").stdout
    refused = project.cli("suppress", "add", "ann@corp.local")
    assert refused.exit_code == 2 and "special-use" in refused.stderr, refused


def test_552_at_data_fails_permanently_without_suppressing(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(3)
    project.write_contacts(emails)
    smtp_server.set_fault(emails[1], "data", "552 5.2.2 mailbox full")

    outcome = project.send("--yes")

    assert outcome.exit_code == 1, outcome
    statuses = assert_consistent(project, smtp_server, emails)
    assert statuses[emails[1]] == "failed"
    row = project.delivery(emails[1])
    assert (row.attempts, row.smtp_code, row.smtp_reply) == (1, 552, "5.2.2 mailbox full")
    # A full mailbox is not a dead one: the address stays mailable.
    assert project.cli("suppress", "list").stdout.splitlines() == ["email,reason,source,added_at"]


def test_421_closes_the_connection_and_the_message_goes_out_on_a_new_one(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(send={"connections": 1})
    emails = addresses(4)
    project.write_contacts(emails)
    smtp_server.set_fault(emails[1], "rcpt", "421 4.7.0 too many errors, closing connection", times=1)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    first, second = rcpt_connections(smtp_server, emails[1])
    assert first != second  # the 421 connection was not used again
    assert all(c != first for c, _ in smtp_server.rcpt_attempts[smtp_server.rcpt_attempts.index((second, emails[1])) :])
    assert smtp_server.connections == 2
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_connection_dropped_before_data_is_retried_and_delivered_once(smtp_server, tmp_path, stage):
    project = Project(tmp_path, smtp_server)
    emails = addresses(4)
    project.write_contacts(emails)
    if stage == "mail":
        fault = smtp_server.set_fault("news@acme.example", "mail", drop=True, times=1)
    else:
        fault = smtp_server.set_fault(emails[2], "rcpt", drop=True, times=1)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert fault.hits == 1
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}
    assert len(smtp_server.messages) == 4


def test_connection_dropped_after_data_is_retried_and_delivered_once(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(4)
    project.write_contacts(emails)
    fault = smtp_server.set_fault(emails[3], "data", drop=True, times=1)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert fault.hits == 1
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}
    assert project.delivery(emails[3]).attempts == 2


def test_connection_always_dropped_after_data_ends_deferred_with_the_doubt_recorded(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(send={"retries": 1})
    emails = addresses(3)
    project.write_contacts(emails)
    smtp_server.set_fault(emails[0], "data", drop=True)

    outcome = project.send("--yes")

    assert outcome.exit_code == 75, outcome
    statuses = assert_consistent(project, smtp_server, emails)
    assert statuses[emails[0]] == "deferred"
    row = project.delivery(emails[0])
    assert row.attempts == 2 and row.smtp_code is None
    assert "closed the connection" in row.smtp_reply and "may have accepted" in row.smtp_reply


def test_stall_past_the_timeout_defers(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(smtp={"timeout": 0.5}, send={"retries": 1})
    emails = addresses(3)
    project.write_contacts(emails)
    fault = smtp_server.set_fault(emails[1], "rcpt", stall=2.0)  # past the command timeout

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 75, outcome
    assert fault.hits == 2
    assert json.loads(outcome.stdout)["counts"]["deferred"] == 1
    statuses = assert_consistent(project, smtp_server, emails)
    assert statuses == {emails[0]: "sent", emails[1]: "deferred", emails[2]: "sent"}
    row = project.delivery(emails[1])
    assert row.attempts == 2 and "timed out" in row.smtp_reply


def test_a_relay_that_hangs_up_idle_connections_gets_every_message_once(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(send={"connections": 1})
    emails = addresses(5)
    project.write_contacts(emails)
    smtp_server.close_connections_after(1, notice="421 4.4.2 idle timeout, closing")

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert set(smtp_server.messages_per_connection().values()) == {1}
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}


def test_max_per_connection_quits_and_reconnects(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(send={"connections": 1, "max_per_connection": 2})
    emails = addresses(5)
    project.write_contacts(emails)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert sorted(smtp_server.messages_per_connection().values()) == [1, 2, 2]
    assert smtp_server.quits == 3
    assert set(assert_consistent(project, smtp_server, emails).values()) == {"sent"}


def test_a_relay_that_is_down_stops_the_run_promptly_with_75_and_says_why(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = closed.getsockname()[1]
    try:
        project.configure(smtp={"port": port}, send={"connections": 2, "retries": 2, "retry_backoff": 0.05})
        emails = addresses(40)
        project.write_contacts(emails)
        started = time.monotonic()
        outcome = project.send("--yes", "--json")
        elapsed = time.monotonic() - started
    finally:
        closed.close()

    assert outcome.exit_code == 75, outcome
    assert elapsed < 10, elapsed
    cause = f"cannot connect to 127.0.0.1:{port}: connection refused"
    # On screen: host, port and the cause, and that the rest was not handed out.
    assert f"the relay could not be reached: {cause} (3 attempts)" in outcome.stderr
    assert "no more messages were handed out" in outcome.stderr
    counts = json.loads(outcome.stdout)["counts"]
    # Only the messages that probed the relay were attempted (one per connection at
    # most); the others were never tried, nor recorded, rather than deferred one by one.
    assert 1 <= counts["deferred"] <= 2, counts
    assert counts["deferred"] + counts["not_attempted"] == 40, counts
    statuses = project.statuses()
    assert len(statuses) == counts["deferred"] and set(statuses.values()) == {"deferred"}
    assert project.delivery(next(iter(statuses))).smtp_reply == cause
    # The report counts the reason, although there was no SMTP reply.
    report = project.report("--campaign", "news")
    assert {"code": None, "count": counts["deferred"], "example_reply": cause} in report["by_smtp_code"]
    human = project.cli("report", "--campaign", "news")
    assert cause in human.stdout

    project.configure(smtp={"port": smtp_server.port})  # the relay is back
    again = project.send("--yes")
    assert again.exit_code == 0, again
    assert sorted(received_addresses(smtp_server)) == sorted(emails)


def test_contacts_from_standard_input(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)

    outcome = project.cli(
        "send",
        "-",
        str(project.template_path),
        "--campaign",
        "piped",
        "--yes",
        input="email,name\nann@example.com,Ann\nbob@example.org,Bob\n",
    )

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(smtp_server)) == ["ann@example.com", "bob@example.org"]
    assert b"Hello Ann," in smtp_server.received_by("ann@example.com")[0].data
    assert project.statuses("piped") == {"ann@example.com": "sent", "bob@example.org": "sent"}


# ---------------------------------------------------------------- rate


def test_rate_is_never_exceeded_over_any_one_second_window(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(50)
    project.write_contacts(emails)

    outcome = project.send("--yes", "--rate", "20/s", "--connections", "4")

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(smtp_server)) == emails
    times = sorted(smtp_server.mail_times)
    assert len(times) == 50
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    assert busiest <= 21, f"{busiest} messages within one second at 20/s"
    # ... and the rate was really applied: 50 messages at 20/s take well over 1.5 s.
    assert times[-1] - times[0] >= 1.5
    assert len(smtp_server.messages_per_connection()) > 1  # the pool was used


# ---------------------------------------------------------------- exit codes


def test_invalid_rows_give_exit_1_and_are_logged_invalid(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@example.com", "jane@", "bob@example.com"])

    outcome = project.send("--yes")

    assert outcome.exit_code == 1, outcome
    assert "contacts.csv:3" in outcome.stderr and "invalid address 1" in outcome.stderr
    assert sorted(received_addresses(smtp_server)) == ["ann@example.com", "bob@example.com"]
    statuses = project.statuses()
    assert statuses["jane@"] == "invalid"
    assert statuses["ann@example.com"] == statuses["bob@example.com"] == "sent"


@pytest.mark.parametrize(
    "bad_line, message",
    [(b"user049@example.com,Caf\xe9\n", "not valid UTF-8"), (b'user049@example.com,"unclosed\n', "not valid CSV")],
    ids=["latin-1-byte", "unclosed-quote"],
)
def test_a_broken_row_deep_in_the_file_stops_the_send_before_anything_goes(smtp_server, tmp_path, bad_line, message):
    project = Project(tmp_path, smtp_server)
    path = project.write_contacts(addresses(49))
    with path.open("ab") as file:
        file.write(bad_line)
        file.write(b"user050@example.com,after\n")

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert "contacts.csv:51" in outcome.stderr and message in outcome.stderr
    assert smtp_server.connections == 0 and received_addresses(smtp_server) == []


def piped_send(project: Project, contacts: bytes, tmpdir: Path) -> subprocess.CompletedProcess:
    """`... | mailer send - TEMPLATE --json` as a real process, with its own TMPDIR."""
    return subprocess.run(
        project._command(("send", "-", str(project.template_path), "--json", "--yes")),
        cwd=project.root,
        env=project._environment({"TMPDIR": str(tmpdir)}),
        input=contacts,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "bad_line, message",
    [(b"user049@example.com,Caf\xe9\n", "not valid UTF-8"), (b'user049@example.com,"unclosed\n', "not valid CSV")],
    ids=["latin-1-byte", "unclosed-quote"],
)
def test_a_broken_row_deep_in_contacts_on_stdin_also_stops_the_send_before_anything_goes(
    smtp_server, tmp_path, bad_line, message
):
    project = Project(tmp_path, smtp_server)
    # More rows before the bad one than go to the delivery process in one batch.
    bad_line = bad_line.replace(b"user049", b"user500")
    contacts = project.write_contacts(addresses(500)).read_bytes() + bad_line + b"user501@example.com,after\n"
    spool = tmp_path / "tmp"
    spool.mkdir()

    done = piped_send(project, contacts, spool)

    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "<stdin>:502" in stderr and message in stderr
    assert smtp_server.connections == 0 and received_addresses(smtp_server) == []
    assert list(spool.iterdir()) == []  # the copy of stdin is gone


def test_contacts_on_stdin_are_sent_and_the_copy_is_removed(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(30)
    contacts = project.write_contacts(emails).read_bytes()
    spool = tmp_path / "tmp"
    spool.mkdir()

    done = piped_send(project, contacts, spool)

    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["counts"]["sent"] == 30
    assert sorted(received_addresses(smtp_server)) == emails
    assert list(spool.iterdir()) == []


def test_bad_config_gives_exit_2_naming_the_file_and_key_and_sends_nothing(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))
    project.configure(send={"ratee": "10/s"})

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert "mailer.toml" in outcome.stderr and "send.ratee" in outcome.stderr
    assert smtp_server.connections == 0 and not project.log_path.exists()


@pytest.mark.parametrize(
    "template, message",
    [
        ("Subject: Hi {{ name }\n\nbody\n", "news.txt.j2"),
        ("Subject: Hi {{ nmae }}\n\nbody\n", "nmae"),
    ],
    ids=["syntax", "unknown-variable"],
)
def test_bad_template_gives_exit_2_and_sends_nothing(smtp_server, tmp_path, template, message):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))
    project.write_template(template)

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert message in outcome.stderr
    assert smtp_server.connections == 0


def test_password_variable_not_set_gives_exit_2_before_connecting(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(smtp={"username": TEST_USERNAME, "password_env": "MAILER_TEST_UNSET_PASSWORD"})
    project.write_contacts(addresses(2))

    outcome = project.send("--yes", env={"MAILER_TEST_UNSET_PASSWORD": None})

    assert outcome.exit_code == 2, outcome
    assert "MAILER_TEST_UNSET_PASSWORD" in outcome.stderr and "not set" in outcome.stderr
    assert smtp_server.connections == 0


def test_plaintext_password_to_a_remote_host_is_refused_before_connecting(smtp_server, tmp_path):
    # 0.0.0.0 is not a loopback address to the settings check, but a connection to it
    # reaches this machine: if the refusal failed, the fixture server would see it.
    project = Project(tmp_path, smtp_server)
    project.configure(smtp={"host": "0.0.0.0", "username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"})
    project.write_contacts(addresses(2))

    outcome = project.send("--yes", env={"MAILER_TEST_PASSWORD": "Xq7-never-in-clear-text"})

    assert outcome.exit_code == 2, outcome
    assert "refusing to send the password to 0.0.0.0" in outcome.stderr
    assert "Xq7-never-in-clear-text" not in outcome.stderr + outcome.stdout
    assert smtp_server.connections == 0 and smtp_server.auth_attempts == []


def test_without_a_terminal_and_without_yes_a_send_is_refused_and_nothing_is_sent(smtp_server, tmp_path):
    # A cron line or a script that forgot --yes: nobody can answer, so nothing may go out.
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))

    in_process = project.send(input="y\n")  # a "y" on a pipe is not an answer
    real = project.run("send", str(project.contacts_path), str(project.template_path), "--json")

    for outcome in (in_process, real):
        assert outcome.exit_code == 2, outcome
        assert "no terminal to ask on" in outcome.stderr and "Add --yes" in outcome.stderr, outcome
        assert "Send campaign" not in outcome.stderr and "Traceback" not in outcome.stderr
        assert outcome.stdout == ""
    assert smtp_server.connections == 0 and smtp_server.messages == []
    assert not project.log_path.exists() or project.statuses() == {}


def test_without_a_terminal_yes_sends_without_asking(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))

    in_process = project.send("--yes", input="n\n")  # a "no" on stdin must not be read as an answer
    assert in_process.exit_code == 0, in_process
    assert "?" not in in_process.stderr and "Send campaign" not in in_process.stderr

    project.write_contacts(addresses(2, prefix="other"))
    real = project.run("send", str(project.contacts_path), str(project.template_path), "-y")
    assert real.exit_code == 0, real
    assert "Send campaign" not in real.stderr
    assert len(smtp_server.messages) == 4


# ---------------------------------------------------------------- the password


SECRET = "Pw-4d1f9c-not-in-any-output"


def secret_forms(password: str) -> list[bytes]:
    """The password and the encodings AUTH PLAIN / LOGIN put on the wire."""
    return [
        password.encode(),
        base64.b64encode(password.encode()),
        base64.b64encode(f"\0{TEST_USERNAME}\0{password}".encode()),
    ]


def assert_nowhere(password: str, *texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for form in secret_forms(password):
            assert form not in data, f"{form!r} leaked"


def test_password_is_used_for_auth_and_appears_in_no_output_or_log(make_smtp_server, tmp_path):
    server = make_smtp_server(password=SECRET, auth_require_tls=False)
    project = Project(tmp_path, server)
    project.configure(smtp={"username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"})
    emails = addresses(3)
    project.write_contacts(emails)
    env = {"MAILER_TEST_PASSWORD": SECRET}

    outcome = project.run(
        "--debug", "send", str(project.contacts_path), str(project.template_path), "--json", "--yes", env=env
    )

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(server)) == emails
    assert server.auth_attempts and all(ok for _, ok in server.auth_attempts)
    report = project.run("report", "--json", env=env)
    human = project.run("report", env=env)
    assert report.exit_code == human.exit_code == 0
    assert_nowhere(
        SECRET, outcome.stdout, outcome.stderr, report.stdout, report.stderr, human.stdout, project.log_bytes()
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_debug_shows_the_smtp_conversation_with_auth_and_the_password_redacted(make_smtp_server, tmp_path, mechanism):
    # With LOGIN only, the password goes alone, in base64, on a line of its own.
    excluded = ("PLAIN",) if mechanism == "LOGIN" else ("LOGIN",)
    server = make_smtp_server(password=SECRET, auth_require_tls=False, auth_exclude=excluded)
    project = Project(tmp_path, server)
    project.configure(smtp={"username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"})
    emails = addresses(2)
    project.write_contacts(emails)
    env = {"MAILER_TEST_PASSWORD": SECRET}

    outcome = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--debug", env=env)

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(server)) == emails
    lines = outcome.stderr.splitlines()
    # Both sides of the conversation, on stderr, numbered by connection.
    assert any(re.fullmatch(r"smtp\[\d+\] S: 220 .*", line) for line in lines), outcome
    assert any(re.fullmatch(r"smtp\[\d+\] C: EHLO .+", line, flags=re.IGNORECASE) for line in lines)
    assert any(re.fullmatch(rf"smtp\[\d+\] C: AUTH {mechanism}( \*{{8}})?", line) for line in lines), outcome
    assert any(re.fullmatch(r"smtp\[\d+\] S: 235 .*", line) for line in lines)
    for address in emails:
        assert any(line.endswith(f"C: RCPT TO:<{address}>") for line in lines)
    assert any(re.fullmatch(r"smtp\[\d+\] C: \(the message: \d+ bytes.*", line) for line in lines)
    assert any(re.fullmatch(r"smtp\[\d+\] S: 250 .*queued.*", line) for line in lines)
    assert outcome.stdout == ""
    assert_nowhere(SECRET, outcome.stdout, outcome.stderr)
    # Without --debug, none of it.
    quiet = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", env=env)
    assert quiet.exit_code == 0 and "smtp[" not in quiet.stderr


def test_rejected_login_exits_2_and_leaks_no_password_even_with_debug(make_smtp_server, dns_server, tmp_path):
    wrong = "Wrong-7c2e-password-value"
    server = make_smtp_server(password=SECRET, auth_require_tls=False)
    # A relay that echoes what it got back in its rejection must not make mailer print it.
    echoed = base64.b64encode(f"\0{TEST_USERNAME}\0{wrong}".encode()).decode()
    server.auth_reject_reply = f"535 5.7.8 authentication failed for {echoed} ({wrong})"
    project = Project(tmp_path, server)
    project.configure(
        smtp={"username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"}, dns={"port": dns_server.port}
    )
    project.write_contacts(addresses(3))
    env = {"MAILER_TEST_PASSWORD": wrong}

    outcome = project.run(
        "--debug", "send", str(project.contacts_path), str(project.template_path), "--json", "--yes", env=env
    )

    assert outcome.exit_code == 2, outcome
    assert "rejected the login as 'mailer-test'" in outcome.stderr and "535" in outcome.stderr
    assert "MAILER_TEST_PASSWORD" in outcome.stderr  # the hint names the variable, not its value
    assert server.messages == [] and server.auth_attempts and not any(ok for _, ok in server.auth_attempts)
    check = project.run("check", "--json", env=env)
    report = project.run("report", "--json", env=env)
    assert_nowhere(
        wrong,
        outcome.stdout,
        outcome.stderr,
        check.stdout,
        check.stderr,
        report.stdout,
        report.stderr,
        project.log_bytes(),
    )
    assert '"auth"' in check.stdout and "rejected" in check.stdout


# ---------------------------------------------------------------- TLS

# The fixture's throwaway CA is trusted through OpenSSL's SSL_CERT_FILE, so the product
# verifies certificates exactly as it does in production (no test-only context).


def trusting(tls_files, **env):
    return {"SSL_CERT_FILE": str(tls_files.ca), "SSL_CERT_DIR": None, **env}


def test_starttls_with_a_verified_certificate_then_login(make_smtp_server, tls_files, tmp_path):
    server = make_smtp_server(starttls=True, password=SECRET)  # AUTH offered only after STARTTLS
    project = Project(tmp_path, server)
    project.configure(smtp={"security": "starttls", "username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"})
    emails = addresses(3)
    project.write_contacts(emails)

    outcome = project.send("--yes", "--json", env=trusting(tls_files, MAILER_TEST_PASSWORD=SECRET))

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(server)) == emails
    assert server.auth_attempts and all(ok for _, ok in server.auth_attempts)
    assert "warning" not in outcome.stderr
    assert_nowhere(SECRET, outcome.stdout, outcome.stderr, project.log_bytes())


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_an_untrusted_certificate_is_refused_before_login_with_exit_2(make_smtp_server, tmp_path, security):
    server = make_smtp_server(starttls=security == "starttls", implicit_tls=security == "tls", password=SECRET)
    project = Project(tmp_path, server)
    project.configure(smtp={"security": security, "username": TEST_USERNAME, "password_env": "MAILER_TEST_PASSWORD"})
    project.write_contacts(addresses(2))

    outcome = project.send("--yes", env={"MAILER_TEST_PASSWORD": SECRET, "SSL_CERT_FILE": None, "SSL_CERT_DIR": None})

    assert outcome.exit_code == 2, outcome
    assert f"the TLS certificate of 127.0.0.1:{server.port} could not be verified" in outcome.stderr
    assert "tls_verify = false" in outcome.stderr  # the way out, named with its risk
    assert server.auth_attempts == [] and server.messages == []
    assert "sending" not in project.statuses().values()


def test_tls_verify_false_sends_and_warns(make_smtp_server, tmp_path):
    server = make_smtp_server(implicit_tls=True)
    project = Project(tmp_path, server)
    project.configure(smtp={"security": "tls", "tls_verify": False})
    project.write_contacts(addresses(2))

    outcome = project.send("--yes", env={"SSL_CERT_FILE": None, "SSL_CERT_DIR": None})

    assert outcome.exit_code == 0, outcome
    assert "TLS certificate verification is OFF" in outcome.stderr
    assert sorted(received_addresses(server)) == addresses(2)


# ---------------------------------------------------------------- on a terminal


def run_on_a_terminal(project: Project, answer: bytes | None, *args: str) -> tuple[int, str, str, str]:
    """Run `mailer send` with stdin and stderr on a pseudo-terminal and stdout piped (as in
    `mailer send ... --json > summary.json` typed at a shell). Answers the prompt with
    ``answer``. Returns (exit code, the prompt, stdout, everything the terminal showed).
    stdout goes to a file: a pipe could lead to a pager on the terminal, and then no
    progress is drawn (tests/test_output.py)."""
    master, slave = pty.openpty()
    stdout_path = project.root / "stdout.txt"
    stdout_file = stdout_path.open("wb")
    process = subprocess.Popen(
        [
            *MAILER,
            "send",
            str(project.contacts_path),
            str(project.template_path),
            *args,
            "--config",
            str(project.config_path),
        ],
        stdin=slave,
        stderr=slave,
        stdout=stdout_file,
        cwd=project.root,
    )
    os.close(slave)
    stdout_file.close()
    shown = b""

    def read(until: bytes | None, timeout: float) -> None:
        nonlocal shown
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (until is None or until not in shown):
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the other side closed
                    return
                if not chunk:
                    return
                shown += chunk
            elif until is None and process.poll() is not None:
                return

    try:
        if answer is not None:
            read(b"]:", 15)
            prompt = shown.decode(errors="replace")
            os.write(master, answer)
        else:
            prompt = ""
        read(None, 30)
        process.wait(timeout=20)
        read(None, 2)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return process.returncode, prompt, stdout_path.read_text(), shown.decode(errors="replace")


def test_on_a_terminal_send_asks_once_and_no_sends_nothing(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(3))

    code, prompt, stdout, shown = run_on_a_terminal(project, b"n\n", "--json")

    assert code == 2, shown
    assert f"Send campaign 'news' to 3 recipients through 127.0.0.1:{smtp_server.port} (none)?" in prompt
    assert "not confirmed; nothing was sent" in shown
    assert stdout == ""  # not even the prompt's trailing space
    assert smtp_server.connections == 0


def test_on_a_terminal_yes_sends_and_stdout_holds_only_the_json(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(3))

    code, prompt, stdout, shown = run_on_a_terminal(project, b"y\n", "--json")

    assert code == 0, shown
    assert prompt.count("Send campaign") == 1
    assert stdout.startswith("{") and json.loads(stdout)["counts"]["sent"] == 3
    assert sorted(received_addresses(smtp_server)) == addresses(3)
    assert "3/3" in shown  # the progress bar ends with the real count

    again_code, _, again_stdout, again_shown = run_on_a_terminal(project, None, "--yes")
    assert again_code == 0 and again_stdout == "", again_shown
    assert "Send campaign" not in again_shown and len(smtp_server.messages) == 3


def test_without_a_terminal_a_plain_progress_line_comes_every_interval(smtp_server, tmp_path, monkeypatch):
    # The contract says every 10 seconds; the interval is shortened so the run stays short.
    monkeypatch.setattr(mailer.cli.output, "PLAIN_PROGRESS_INTERVAL", 0.25)
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(12))

    outcome = project.send("--yes", "--rate", "10/s")

    assert outcome.exit_code == 0, outcome
    lines = [line for line in outcome.stderr.splitlines() if line.startswith("sending news:")]
    assert len(lines) >= 3, outcome.stderr  # ~1.1 s of sending
    # A line that comes before the first reply (a loaded machine) says "0 done, 0/s".
    assert all(re.fullmatch(r"sending news: \d+ done( \(sent \d+\))?, \d+/s", line) for line in lines), lines
    assert all(("(sent" in line) == (not line.startswith("sending news: 0 done")) for line in lines), lines
    done = [int(line.split()[2]) for line in lines]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] <= 12


def test_a_lost_final_reply_leaves_the_recipient_unknown_reported_and_resent_only_on_request(smtp_server, tmp_path):
    """The relay swallows the reply to the end of one message: waited for the (short,
    configured) final-reply time, then `sending`: counted, reported, never resent by
    itself, resent with --resend-unknown."""
    project = Project(tmp_path, smtp_server)
    project.configure(smtp={"data_timeout": 0.5}, send={"retries": 3})
    emails = addresses(4)
    project.write_contacts(emails)
    lost = emails[1]
    smtp_server.set_fault(lost, "data", reply="250 2.0.0 OK: queued", stall=3.0, times=1)

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 1, outcome  # an unknown outcome does not settle by waiting
    counts = json.loads(outcome.stdout)["counts"]
    assert counts["sent"] == 3 and counts["unknown"] == 1, counts
    assert "outcome unknown (status sending; see mailer report) 1" in outcome.stderr
    assert project.statuses()[lost] == "sending"
    assert [row["recipient"] for row in project.report("--campaign", "news")["unknown_outcome"]] == [lost]
    time.sleep(3.0)  # the slow relay is done with it, whatever it did
    copies = len(smtp_server.received_by(lost))
    assert copies <= 1

    again = project.send("--yes", "--json")
    assert again.exit_code == 1, again
    assert json.loads(again.stdout)["counts"]["unknown"] == 1
    assert len(smtp_server.received_by(lost)) == copies  # not resent by itself

    resend = project.send("--yes", "--resend-unknown")
    assert resend.exit_code == 0, resend
    assert len(smtp_server.received_by(lost)) == copies + 1
    assert project.statuses()[lost] == "sent"
