"""The IMAP bounce source (mailer/bounces/imap.py) against tests/imap_server.py on loopback.

imapclient talks to the server unmodified, over implicit TLS and STARTTLS with the
throwaway CA of smtp_fixtures, or in clear text to loopback. The server records the
commands it got, so batching, BODY.PEEK[] and the MOVE fallback are seen on the wire.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl

import pytest
from imap_server import IMAPTestServer

from mailer.bounces.imap import (
    DEFAULT_PASSWORD_ENV,
    MarkAction,
    imap_password,
    open_imap_source,
    parse_imap_url,
)
from mailer.bounces.sources import BounceSource, SourceError, SourceOptions, open_source
from mailer.core.errors import ExitCode

USER = "bounces@acme.example"
# Quotes, a backslash and a space: the LOGIN quoting must carry them, the trace must hide them.
PASSWORD = 'Tr0ub4dor "&" 3\\x'


@pytest.fixture
def make_imap_server(request):
    servers: list[IMAPTestServer] = []

    def make(**options) -> IMAPTestServer:
        if options.get("starttls") or options.get("implicit_tls"):
            options["tls_files"] = request.getfixturevalue("tls_files")
        server = IMAPTestServer(username=USER, password=PASSWORD, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def message(number: int, *, size: int = 0) -> bytes:
    filler = b"x" * size
    return (
        b"From: MAILER-DAEMON@mx.example\r\nTo: bounces@acme.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender %d\r\n"
        b"Message-ID: <dsn-%d@mx.example>\r\n\r\nbody %d\r\n%s\r\n" % (number, number, number, filler)
    )


def fill(server: IMAPTestServer, count: int, **options) -> list[bytes]:
    raws = [message(number, **options) for number in range(count)]
    for raw in raws:
        server.add_message(raw)
    return raws


def url(server: IMAPTestServer, *, scheme: str = "imaps", host: str = "127.0.0.1", mailbox: str = "INBOX") -> str:
    return f"{scheme}://bounces%40acme.example@{host}:{server.port}/{mailbox}"


def open_imap(server: IMAPTestServer, context: ssl.SSLContext | None, *, url_text: str | None = None, **options):
    """open_imap_source with the test CA; SourceOptions fields and keyword arguments mixed."""
    fields = {name: options.pop(name) for name in ("since", "mark_seen", "move_to", "password_env") if name in options}
    options.setdefault("password", PASSWORD)
    target = url_text or url(server)
    return open_imap_source(target, SourceOptions(**fields), ssl_context=context, timeout=30, **options)


def fetch_lines(server: IMAPTestServer) -> list[str]:
    return [command for command in server.commands if command.startswith("UID FETCH") and "BODY.PEEK[]" in command]


def uid_count(command: str) -> int:
    uid_set = command.split()[2]
    total = 0
    for part in uid_set.split(","):
        low, _, high = part.partition(":")
        total += int(high or low) - int(low) + 1
    return total


# --------------------------------------------------------------------------------------
# What the user writes


def test_url_parts_and_defaults():
    location = parse_imap_url("imaps://bounces%40acme.example@mail.acme.example/INBOX/Bounces")
    assert (location.user, location.host, location.port, location.mailbox) == (
        "bounces@acme.example",
        "mail.acme.example",
        993,
        "INBOX/Bounces",
    )
    assert parse_imap_url("imap://ann@MAIL.example").port == 143
    assert parse_imap_url("imap://ann@mail.example").mailbox == "INBOX"
    # A bare @ in the user name: the last one ends it.
    assert parse_imap_url("imaps://ann@acme.example@mail.example:1993/Bounces").user == "ann@acme.example"
    ipv6 = parse_imap_url("imaps://ann@[::1]:9993/INBOX")
    assert ipv6.host == "::1" and ipv6.address == "[::1]:9993"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("pop3://ann@mail.example/INBOX", "not an IMAP URL"),
        ("imaps://mail.example/INBOX", "names no user"),
        ("imaps://ann@:993/INBOX", "names no host"),
        ("imaps://ann@mail.example:99999/INBOX", "bad port"),
        ("imaps://ann@mail.example:x/INBOX", "bad port"),
        ("imaps://ann@mail.example/INBOX?x=1", "parts mailer does not use"),
        ("imaps://ann@mail.example/INBOX;UID=3", "parts mailer does not use"),
        ("imaps://ann;AUTH=*@mail.example/INBOX", "AUTH mechanism"),
        ("imaps://ann@mail.example/IN%0D%0ABOX", "control characters"),
        ("imaps://ann@mail.example/%ff", "not valid UTF-8"),
    ],
)
def test_bad_urls_are_usage_errors(text, words):
    with pytest.raises(SourceError) as caught:
        parse_imap_url(text)
    assert words in str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE
    assert "\r" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_password_in_the_url_is_refused_without_echoing_it():
    with pytest.raises(SourceError) as caught:
        parse_imap_url("imaps://ann:hunter2-secret@mail.example/INBOX")
    assert "holds a password" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert DEFAULT_PASSWORD_ENV in str(caught.value)


def test_mark_options():
    assert MarkAction.from_options(SourceOptions()) == MarkAction("none")
    assert MarkAction.from_options(SourceOptions(mark_seen=True)) == MarkAction("seen")
    assert MarkAction.from_options(SourceOptions(move_to="Processed/Bounces")) == MarkAction(
        "move", "Processed/Bounces"
    )
    for bad in (
        SourceOptions(move_to=" "),
        SourceOptions(move_to="A\r\nB"),
        SourceOptions(mark_seen=True, move_to="X"),
    ):
        with pytest.raises(SourceError) as caught:
            MarkAction.from_options(bad)
        assert caught.value.exit_code == ExitCode.USAGE


def test_password_variable():
    assert imap_password({"MAILER_IMAP_PASSWORD": "s3"}) == "s3"
    assert imap_password({"OTHER": "s4"}, "OTHER") == "s4"
    with pytest.raises(SourceError, match="MAILER_IMAP_PASSWORD is not set"):
        imap_password({})
    with pytest.raises(SourceError, match="OTHER is empty"):
        imap_password({"OTHER": ""}, "OTHER")


# --------------------------------------------------------------------------------------
# Reading


def test_reads_every_message_over_tls_without_marking_it(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    raws = fill(server, 5)
    validity = server.mailboxes["INBOX"].uid_validity
    with open_imap(server, client_tls_context) as source:
        read = list(source)
    assert [m.raw for m in read] == raws
    assert [m.ref for m in read] == [f"{validity}:{uid}" for uid in range(1, 6)]
    assert server.logins == [(USER, PASSWORD)]
    # Read-only (mark none), and BODY.PEEK[]: nothing is flagged \Seen by reading.
    assert 'EXAMINE "INBOX"' in server.commands
    assert all(not m.flags for m in server.messages())
    assert fetch_lines(server)


def test_refs_are_stable_across_runs(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    fill(server, 3)
    with open_imap(server, client_tls_context) as source:
        first = [m.ref for m in source]
    server.add_message(message(99))
    with open_imap(server, client_tls_context) as source:
        second = [m.ref for m in source]
    assert second[:3] == first and len(second) == 4


def test_starttls(make_imap_server, client_tls_context):
    server = make_imap_server(starttls=True)
    raws = fill(server, 2)
    with open_imap(server, client_tls_context, url_text=url(server, scheme="imap")) as source:
        assert [m.raw for m in source] == raws
    assert server.commands.index("STARTTLS") < next(i for i, c in enumerate(server.commands) if c.startswith("LOGIN"))


def test_plain_imap_only_to_this_machine(make_imap_server):
    server = make_imap_server()
    raws = fill(server, 2)
    with open_imap(server, None, url_text=url(server, scheme="imap")) as source:
        assert [m.raw for m in source] == raws
    # "127.1" reaches the same loopback server, but is not a name mailer trusts as this
    # machine: the password must not go in clear.
    with pytest.raises(SourceError) as caught:
        open_imap(server, None, url_text=url(server, scheme="imap", host="127.1"))
    assert "offers no STARTTLS" in str(caught.value) and f"127.1:{server.port}" in str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE
    assert len(server.logins) == 1


def test_an_untrusted_certificate_is_refused(make_imap_server):
    server = make_imap_server(implicit_tls=True)
    with pytest.raises(SourceError) as caught:
        open_imap(server, ssl.create_default_context())
    text = str(caught.value)
    assert "certificate cannot be verified" in text and f"127.0.0.1:{server.port}" in text
    assert "SSL_CERT_FILE" in text and caught.value.exit_code == ExitCode.USAGE
    assert server.logins == []


def test_since_filter(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    for day in (1, 5, 10, 20):
        server.add_message(message(day), internal_date=dt.datetime(2026, 11, day, 12, tzinfo=dt.UTC))
    with open_imap(server, client_tls_context, since=dt.date(2026, 11, 10)) as source:
        read = list(source)
    assert [m.raw for m in read] == [message(10), message(20)]
    assert "UID SEARCH SINCE 10-Nov-2026" in server.commands


def test_batches_bound_what_is_fetched_at_once(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    raws = fill(server, 1050)
    with open_imap(server, client_tls_context, batch_size=100) as source:
        read = list(source)
    assert [m.raw for m in read] == raws
    assert len({m.ref for m in read}) == 1050
    lines = fetch_lines(server)
    assert len(lines) == 11
    assert max(uid_count(line) for line in lines) == 100
    assert sum(uid_count(line) for line in lines) == 1050


def test_batches_are_also_bounded_in_bytes(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    raws = fill(server, 10, size=50_000)
    with open_imap(server, client_tls_context, batch_size=100, batch_bytes=120_000) as source:
        assert [m.raw for m in source] == raws
    lines = fetch_lines(server)
    assert max(uid_count(line) for line in lines) == 2 and sum(uid_count(line) for line in lines) == 10


def test_a_huge_message_is_read_only_up_to_the_cap(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    small, huge, after = message(1), message(2, size=200_000), message(3)
    for raw in (small, huge, after):
        server.add_message(raw)
    with open_imap(server, client_tls_context, max_message_bytes=50_000) as source:
        read = list(source)
    assert [m.raw for m in read] == [small, huge[:50_000], after]
    assert [m.truncated for m in read] == [False, True, False]
    assert "UID FETCH 2 (BODY.PEEK[]<0.50000>)" in server.commands


def test_a_dropped_connection_is_reopened_and_nothing_is_read_twice(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True, drop_after=25)
    raws = fill(server, 60)
    with open_imap(server, client_tls_context, batch_size=10) as source:
        read = list(source)
    assert [m.raw for m in read] == raws
    assert len(server.logins) == 2


def test_a_server_that_keeps_dropping_is_try_again_later(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True, drop_after=5, drop_times=100)
    fill(server, 40)
    read = []
    with pytest.raises(SourceError) as caught, open_imap(server, client_tls_context, batch_size=10) as source:
        for item in source:
            read.append(item)
    text = str(caught.value)
    assert "connection was lost while fetching messages" in text and f"127.0.0.1:{server.port}" in text
    assert "'INBOX'" in text and PASSWORD not in text
    assert caught.value.exit_code == ExitCode.TEMPFAIL
    assert len(read) == len({m.ref for m in read})


# --------------------------------------------------------------------------------------
# Marking


def test_mark_seen_flags_only_the_processed_messages(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    fill(server, 4)
    with open_imap(server, client_tls_context, mark_seen=True) as source:
        read = list(source)
        source.mark_processed([read[0].ref, read[2].ref, "0:3", "junk"])
    assert [r"\Seen" in m.flags for m in server.messages()] == [True, False, True, False]
    assert 'SELECT "INBOX"' in server.commands


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"move": True}, ["UID MOVE 1,3 "]),
        ({"move": False}, ["UID COPY 1,3 ", r"UID STORE 1,3 +FLAGS.SILENT (\Deleted)", "UID EXPUNGE 1,3"]),
        ({"move": False, "uidplus": False}, ["UID COPY 1,3 ", r"UID STORE 1,3 +FLAGS.SILENT (\Deleted)", "EXPUNGE"]),
    ],
)
def test_move_with_and_without_the_move_capability(make_imap_server, client_tls_context, capabilities, expected):
    server = make_imap_server(implicit_tls=True, **capabilities)
    server.create_mailbox("Processed")
    raws = fill(server, 4)
    with open_imap(server, client_tls_context, move_to="Processed") as source:
        read = list(source)
        source.mark_processed([read[0].ref, read[2].ref])
    assert [m.raw for m in server.messages("INBOX")] == [raws[1], raws[3]]
    assert [m.raw for m in server.messages("Processed")] == [raws[0], raws[2]]
    assert all(m.flags == {r"\Seen"} for m in server.messages("Processed"))
    commands = server.commands[server.commands.index('SELECT "INBOX"') :]
    for command in expected:
        assert any(line.startswith(command) for line in commands), (command, commands)
    if not capabilities.get("move", True):
        assert not any(line.startswith("UID MOVE") for line in commands)
    # A second run reads only what was not moved.
    with open_imap(server, client_tls_context, move_to="Processed") as source:
        assert [m.raw for m in source] == [raws[1], raws[3]]


def test_a_missing_move_folder_is_found_before_reading(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    fill(server, 2)
    with pytest.raises(SourceError) as caught:
        open_imap(server, client_tls_context, move_to="Nowhere")
    assert (
        "'Nowhere'" in str(caught.value) and "--move-to" in str(caught.value) and "does not exist" in str(caught.value)
    )
    assert caught.value.exit_code == ExitCode.USAGE
    assert fetch_lines(server) == []
    with pytest.raises(SourceError, match="names the mailbox being read"):
        open_imap(server, client_tls_context, move_to="INBOX")


# --------------------------------------------------------------------------------------
# Errors


def test_bad_login(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True, bad_login=True)
    with pytest.raises(SourceError) as caught:
        open_imap(server, client_tls_context, password_env="ACME_IMAP_PASSWORD")
    text = str(caught.value)
    assert f"IMAP server 127.0.0.1:{server.port}" in text and "'INBOX'" in text and USER in text
    assert "login was refused" in text and "AUTHENTICATIONFAILED" in text and "$ACME_IMAP_PASSWORD" in text
    assert PASSWORD not in text and "Tr0ub4dor" not in text
    assert caught.value.exit_code == ExitCode.USAGE


def test_unreachable_server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SourceError) as caught:
        open_imap_source(f"imaps://ann@127.0.0.1:{port}/INBOX", password=PASSWORD, timeout=10)
    text = str(caught.value)
    assert f"IMAP server 127.0.0.1:{port}" in text and "cannot connect" in text and "'INBOX'" in text
    assert PASSWORD not in text and caught.value.exit_code == ExitCode.USAGE


def test_missing_mailbox(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    with pytest.raises(SourceError) as caught:
        open_imap(server, client_tls_context, url_text=url(server, mailbox="Bounces"))
    text = str(caught.value)
    assert f"127.0.0.1:{server.port}" in text and "'Bounces'" in text and "cannot be opened" in text
    assert PASSWORD not in text and caught.value.exit_code == ExitCode.USAGE


def test_the_debug_trace_never_shows_the_password(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    fill(server, 3)
    lines: list[str] = []
    with open_imap(server, client_tls_context, mark_seen=True, debug=lines.append) as source:
        source.mark_processed([m.ref for m in source])
    trace = "".join(lines)
    assert re.search(r"LOGIN .*\*{8}", trace)
    assert "EXAMINE" not in trace and "SELECT" in trace and "UID FETCH" in trace and "STORE" in trace
    for form in (PASSWORD, "Tr0ub4dor", '\\"&\\"'):
        assert form not in trace
    # And a refused login shows nothing more.
    lines.clear()
    refusing = make_imap_server(implicit_tls=True, bad_login=True)
    with pytest.raises(SourceError):
        open_imap(refusing, client_tls_context, debug=lines.append)
    assert lines and "Tr0ub4dor" not in "".join(lines)


def test_the_password_comes_from_the_named_variable(make_imap_server, client_tls_context):
    server = make_imap_server(implicit_tls=True)
    fill(server, 1)
    with open_imap(server, client_tls_context, password=None, environ={"MAILER_IMAP_PASSWORD": PASSWORD}) as source:
        assert len(list(source)) == 1
    env = {"ACME_IMAP": PASSWORD, "MAILER_IMAP_PASSWORD": "wrong"}
    with open_imap(server, client_tls_context, password=None, environ=env, password_env="ACME_IMAP") as source:
        assert len(list(source)) == 1
    with pytest.raises(SourceError, match="ACME_IMAP is not set") as caught:
        open_imap(server, client_tls_context, password=None, environ={}, password_env="ACME_IMAP")
    assert caught.value.exit_code == ExitCode.USAGE
    assert server.logins == [(USER, PASSWORD), (USER, PASSWORD)]


def test_open_source_dispatches_imap_urls(make_imap_server, monkeypatch):
    server = make_imap_server()
    raws = fill(server, 3)
    monkeypatch.setenv("ACME_IMAP", PASSWORD)
    source = open_source(url(server, scheme="imap"), SourceOptions(password_env="ACME_IMAP", mark_seen=True))
    try:
        assert isinstance(source, BounceSource)
        assert source.name == f"imap://{USER}@127.0.0.1:{server.port}/INBOX"
        read = list(source)
        assert [m.raw for m in read] == raws
        source.mark_processed([read[1].ref])
    finally:
        source.close()
    assert [r"\Seen" in m.flags for m in server.messages()] == [False, True, False]


@pytest.mark.parametrize("move", [True, False])
def test_marking_while_reading_as_the_bounces_command_does(make_imap_server, client_tls_context, move):
    # process_bounces marks each batch it recorded while the source is still being read.
    server = make_imap_server(implicit_tls=True, move=move)
    server.create_mailbox("Processed")
    raws = fill(server, 95)
    read, pending = [], []
    with open_imap(server, client_tls_context, move_to="Processed", batch_size=10) as source:
        for item in source:
            read.append(item)
            pending.append(item.ref)
            if len(pending) == 7:
                source.mark_processed(pending)
                pending = []
        source.mark_processed(pending)
    assert [m.raw for m in read] == raws
    assert server.messages("INBOX") == []
    assert sorted(m.raw for m in server.messages("Processed")) == sorted(raws)


# --------------------------------------------------------------------------------------
# Through the CLI: `mailer bounces imaps://...`


def postfix_dsn(recipient: str, original_message_id: str, *, status: str = "5.1.1", number: int = 0) -> bytes:
    """A bounce as Postfix writes it: multipart/report with message/delivery-status."""
    text = (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        "To: news@acme.example\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn-{number}-{status}@mx.example.net>\r\n"
        "Date: Wed, 02 Dec 2026 14:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"\r\n'
        "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n"
        "Arrival-Date: Wed, 02 Dec 2026 13:59:58 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        "Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected: User unknown\r\n\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        "From: Acme News <news@acme.example>\r\n"
        f"To: {recipient}\r\n"
        "Subject: News\r\n"
        f"Message-ID: {original_message_id}\r\n\r\n"
        "--BOUNDARY--\r\n"
    )
    return text.encode("ascii")


@pytest.fixture
def sent_project(tmp_path, smtp_server):
    from send_support import Project

    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@example.com", "bob@example.com", "cat@example.com"])
    outcome = project.send("--yes")
    assert outcome.exit_code == 0, outcome
    return project


def bounces_cli(project, *args: str, password: str | None = PASSWORD, tls_files=None):
    env = {"MAILER_IMAP_PASSWORD": password}
    if tls_files is not None:  # the product verifies against the system store: point it at the test CA
        env.update({"SSL_CERT_FILE": str(tls_files.ca), "SSL_CERT_DIR": None})
    return project.cli("bounces", *args, env=env)


def test_cli_reads_dsns_from_imap_and_suppresses_once(sent_project, make_imap_server, tls_files):
    import json

    project = sent_project
    server = make_imap_server(implicit_tls=True)
    server.create_mailbox("Processed")
    ann_id = project.delivery("ann@example.com").message_id
    bob_id = project.delivery("bob@example.com").message_id
    server.add_message(postfix_dsn("ann@example.com", ann_id, number=1))
    server.add_message(postfix_dsn("bob@example.com", bob_id, status="4.2.2", number=2))
    server.add_message(message(3))  # a human's mail: stays where it is

    first = bounces_cli(project, url(server), "--json", "--mark-seen", tls_files=tls_files)
    assert first.exit_code == 0, first
    counts = json.loads(first.stdout)
    assert counts["read"] == 3 and counts["hard"] == 1 and counts["soft"] == 1 and counts["suppressed"] == 1
    listed = project.cli("suppress", "list")
    assert "ann@example.com" in listed.stdout and "bob@example.com" not in listed.stdout
    assert [r"\Seen" in m.flags for m in server.messages()] == [True, True, False]

    again = bounces_cli(project, url(server), "--json", "--move-to", "Processed", tls_files=tls_files)
    assert again.exit_code == 0, again
    counts = json.loads(again.stdout)
    assert counts["read"] == 3 and counts["hard"] == 0 and counts["soft"] == 0 and counts["suppressed"] == 0
    assert counts["duplicates"] == 2
    assert [m.raw for m in server.messages("INBOX")] == [message(3)]
    assert len(server.messages("Processed")) == 2

    third = bounces_cli(project, url(server), "--json", "--move-to", "Processed", tls_files=tls_files)
    assert third.exit_code == 0, third
    assert json.loads(third.stdout)["read"] == 1


@pytest.mark.parametrize("case", ["bad login", "unreachable", "missing mailbox", "no password", "untrusted"])
def test_cli_errors_are_exit_2_naming_the_server(sent_project, make_imap_server, tls_files, case):
    project = sent_project
    server = make_imap_server(implicit_tls=True, bad_login=case == "bad login")
    target = url(server, mailbox="Bounces" if case == "missing mailbox" else "INBOX")
    if case == "unreachable":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        target = f"imaps://ann@127.0.0.1:{port}/INBOX"
    outcome = bounces_cli(
        project,
        target,
        "--debug",
        password=None if case == "no password" else PASSWORD,
        tls_files=None if case == "untrusted" else tls_files,
    )
    assert outcome.exit_code == 2, outcome
    expected = {
        "bad login": "login was refused",
        "unreachable": "cannot connect",
        "missing mailbox": "'Bounces'",
        "no password": "MAILER_IMAP_PASSWORD is not set",
        "untrusted": "certificate cannot be verified",
    }[case]
    assert expected in outcome.stderr
    if case != "no password":
        assert "IMAP server 127.0.0.1:" in outcome.stderr
    for form in (PASSWORD, "Tr0ub4dor"):
        assert form not in outcome.stderr and form not in outcome.stdout


def test_cli_debug_shows_the_imap_conversation_without_the_password(sent_project, make_imap_server, tls_files):
    project = sent_project
    server = make_imap_server(implicit_tls=True)
    server.add_message(message(1))
    outcome = bounces_cli(project, url(server), "--mark-seen", "--debug", tls_files=tls_files)
    assert outcome.exit_code == 0, outcome
    assert re.search(r"imap: > LOGIN bounces@acme.example \*{8}", outcome.stderr)
    assert 'SELECT "INBOX"' in outcome.stderr and "UID FETCH" in outcome.stderr
    for form in (PASSWORD, "Tr0ub4dor", '\\"&\\"'):
        assert form not in outcome.stderr and form not in outcome.stdout
