"""Tests for mailer.delivery against a real SMTP server on loopback (tests/smtp_fixtures.py).

Nothing in smtplib is mocked: only time (short timeouts, a zero or tiny backoff) and
randomness (the jitter) are chosen by the tests.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time

import pytest
from smtp_fixtures import TEST_USERNAME

import mailer.delivery.pool as delivery_module
from mailer.bounces.rules import is_hard_bounce
from mailer.core.config import SendConfig, SMTPConfig
from mailer.core.errors import ConnectionSetupError, ExitCode, PermanentDeliveryError, TemporaryDeliveryError
from mailer.core.outcomes import Outgoing, Result, Status
from mailer.delivery.pool import deliver
from mailer.smtp.policy import (
    TLS_VERIFY_DISABLED_WARNING,
    check_relay_settings,
    is_loopback_address,
    is_loopback_host,
    tls_verification_warning,
)
from mailer.smtp.probe import probe_relay
from mailer.smtp.replies import classify_exception, classify_reply, closes_connection
from mailer.smtp.session import Setup

PASSWORD = "s3cret-Pa55word!"


class RecordingListener:
    """Records every call; optional hooks let a test react (set stop, raise)."""

    def __init__(self, on_sending=None, on_result=None) -> None:
        self.events: list[tuple] = []  # ("sending", key, attempt, t) / ("result", key, Result, t)
        self.lock = threading.Lock()
        self._on_sending = on_sending
        self._on_result = on_result
        self.concurrent = 0
        self.max_concurrent = 0

    def on_sending(self, item: Outgoing, attempt: int) -> None:
        self._enter()
        try:
            self.events.append(("sending", item.key, attempt, time.monotonic()))
            if self._on_sending:
                self._on_sending(item, attempt)
        finally:
            self._leave()

    def on_result(self, item: Outgoing, result: Result) -> None:
        self._enter()
        try:
            self.events.append(("result", item.key, result, time.monotonic()))
            if self._on_result:
                self._on_result(item, result)
        finally:
            self._leave()

    def _enter(self):
        with self.lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)

    def _leave(self):
        with self.lock:
            self.concurrent -= 1

    def for_key(self, key) -> list[tuple]:
        return [e for e in self.events if e[1] == key]

    def results(self, key) -> list[Result]:
        return [e[2] for e in self.events if e[0] == "result" and e[1] == key]

    def finals(self) -> dict:
        finals: dict = {}
        for kind, key, value, _ in self.events:
            if kind == "result" and value.final:
                assert key not in finals, f"two final results for {key!r}"
                finals[key] = value
        return finals

    def sending_keys(self) -> set:
        return {e[1] for e in self.events if e[0] == "sending"}


def make_items(count: int, *, prefix: str = "user", body: bytes | None = None) -> list[Outgoing]:
    items = []
    for index in range(count):
        address = f"{prefix}{index}@example.com"
        data = (
            body
            or (
                f"From: news@example.com\r\nTo: {address}\r\nSubject: hello {index}\r\n"
                f"Message-ID: <{index}@example.com>\r\n\r\nHi {index}\r\n.leading dot\r\n.\r\nbye\r\n"
            ).encode()
        )
        items.append(
            Outgoing(
                key=index,
                sender="news@example.com",
                recipients=[address],
                data=data,
                message_id=f"<{index}@example.com>",
            )
        )
    return items


def smtp_for(server, **options) -> SMTPConfig:
    values = {"host": server.host, "port": server.port, "security": "none", "timeout": 5.0}
    values.update(options)
    return SMTPConfig(**values)


def send_options(**options) -> SendConfig:
    values = {"rate": "unlimited", "connections": 2, "max_per_connection": 100, "retries": 3, "retry_backoff": 0.0}
    values.update(options)
    return SendConfig(**values)


def run(server, items, *, smtp=None, send=None, password=None, listener=None, stop=None, **kwargs):
    listener = listener or RecordingListener()
    stats = deliver(
        items,
        smtp=smtp or smtp_for(server),
        send=send or send_options(),
        password=password,
        listener=listener,
        stop=stop or threading.Event(),
        **kwargs,
    )
    return stats, listener


def assert_consistent(listener: RecordingListener, keys) -> dict:
    """Every key got exactly one final result, every on_sending was answered, and the
    final result came last."""
    finals = listener.finals()
    assert set(finals) == set(keys)
    for key in keys:
        events = listener.for_key(key)
        assert events[-1][0] == "result" and events[-1][2].final
        # A result may come without on_sending (no transaction was started: connection
        # refused, SMTPUTF8 missing), but on_sending is always answered by a result.
        sending = False
        for kind, *_ in events:
            assert not (kind == "sending" and sending), f"{key}: on_sending twice without a result"
            sending = kind == "sending"
    return finals


def assert_no_duplicates(server) -> None:
    seen = [r for m in server.messages for r in m.rcpt_tos]
    assert len(seen) == len(set(seen)), "somebody received two copies"


# --------------------------------------------------------------------------------------
# The happy path


def test_delivers_each_message_once_reusing_connections(smtp_server):
    items = make_items(50)
    stats, listener = run(smtp_server, items, send=send_options(connections=3, max_per_connection=10))
    finals = assert_consistent(listener, range(50))
    assert {r.status for r in finals.values()} == {Status.SENT}
    assert all(r.attempts == 1 and r.smtp_code == 250 for r in finals.values())
    assert len(smtp_server.messages) == 50
    assert_no_duplicates(smtp_server)
    per_connection = smtp_server.messages_per_connection()
    assert max(per_connection.values()) <= 10
    assert 5 <= len(per_connection) <= 8  # reused: far fewer connections than messages
    assert stats.connections_opened == smtp_server.connections == len(per_connection)
    assert smtp_server.quits == smtp_server.connections  # every connection ended with QUIT
    assert (stats.items, stats.sent, stats.failed, stats.deferred, stats.attempts) == (50, 50, 0, 0, 50)
    assert stats.untouched == stats.waiting_retry == 0 and not stats.interrupted
    assert listener.max_concurrent == 1  # the engine serializes listener calls


def test_message_content_arrives_intact(smtp_server):
    body = b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nend\r\n"
    (item,) = make_items(1, body=body)
    run(smtp_server, [item])
    (message,) = smtp_server.messages
    assert message.data == body  # dot-stuffing undone by the server: byte for byte
    assert message.mail_from == "news@example.com"
    assert f"SIZE={len(body)}" in message.mail_options


def test_bare_newlines_are_sent_as_crlf(smtp_server):
    (item,) = make_items(1, body=b"Subject: lf\n\nline one\nline two")
    run(smtp_server, [item])
    assert smtp_server.messages[0].data == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


def test_works_without_pipelining_and_resets_after_a_refusal(make_smtp_server):
    server = make_smtp_server(pipelining=False)
    server.set_fault("user1@example.com", "rcpt", "550 5.1.1 user unknown")
    items = make_items(4)
    stats, listener = run(server, items, send=send_options(connections=1))
    finals = assert_consistent(listener, range(4))
    assert [finals[k].status for k in range(4)] == [Status.SENT, Status.FAILED, Status.SENT, Status.SENT]
    assert server.connections == 1  # RSET kept the session usable after the refusal
    assert len(server.messages) == 3


def test_multiple_recipients_partly_refused(smtp_server):
    smtp_server.set_fault("bad@example.com", "rcpt", "550 5.1.1 user unknown")
    item = Outgoing(
        key="k",
        sender="news@example.com",
        recipients=["good@example.com", "bad@example.com"],
        data=b"Subject: two\r\n\r\nhi\r\n",
        message_id="<k@example.com>",
    )
    both_bad = Outgoing(
        key="b",
        sender="news@example.com",
        recipients=["bad@example.com", "bad@example.com"],
        data=b"Subject: two\r\n\r\nhi\r\n",
        message_id="<b@example.com>",
    )
    _, listener = run(smtp_server, [item, both_bad], send=send_options(connections=1))
    finals = assert_consistent(listener, ["k", "b"])
    assert finals["k"].status == Status.SENT and "bad@example.com: 550" in finals["k"].smtp_reply
    assert finals["b"].status == Status.FAILED and finals["b"].smtp_code == 550
    assert [m.rcpt_tos for m in smtp_server.messages] == [["good@example.com"]]


def test_invalid_envelope_address_fails_without_a_transaction(smtp_server):
    item = Outgoing(
        key="x",
        sender="news@example.com",
        recipients=["a@example.com>\r\nRCPT TO:<b@example.com"],
        data=b"Subject: x\r\n\r\nx\r\n",
        message_id="<x@example.com>",
    )
    _, listener = run(smtp_server, [item])
    assert listener.finals()["x"].status == Status.FAILED
    assert listener.sending_keys() == set()
    assert smtp_server.rcpt_attempts == []


# --------------------------------------------------------------------------------------
# Faults


def test_temporary_failures_are_retried_with_backoff_then_succeed(smtp_server):
    smtp_server.set_fault("user1@example.com", "rcpt", "451 4.7.1 greylisted, try again", times=2)
    items = make_items(3)
    stats, listener = run(smtp_server, items, send=send_options(retry_backoff=0.05), rng=lambda: 0.0)
    finals = assert_consistent(listener, range(3))
    assert finals[1] == Result(Status.SENT, True, 3, 250, "2.0.0 OK: queued")
    events = listener.for_key(1)
    assert [(e[0], e[2] if e[0] == "sending" else (e[2].status, e[2].final, e[2].smtp_code)) for e in events] == [
        ("sending", 1),
        ("result", (Status.DEFERRED, False, 451)),
        ("sending", 2),
        ("result", (Status.DEFERRED, False, 451)),
        ("sending", 3),
        ("result", (Status.SENT, True, 250)),
    ]
    # Backoff 0.05 s then 0.1 s (jitter 0) between a deferral and the next attempt.
    assert events[2][3] - events[1][3] >= 0.05
    assert events[4][3] - events[3][3] >= 0.1
    assert [a for _, a in smtp_server.rcpt_attempts].count("user1@example.com") == 3
    assert len(smtp_server.received_by("user1@example.com")) == 1
    assert stats.retries == 2 and stats.attempts == 5


@pytest.mark.parametrize(
    "stage,reply",
    [
        ("rcpt", "452 4.2.2 mailbox full, try later"),
        ("data", "451 4.3.0 local error"),
        ("data", "421 4.3.2 shutting down"),
        ("mail", "451 4.3.5 sender check unavailable"),
    ],
)
def test_each_temporary_fault_is_retried_and_delivered_exactly_once(smtp_server, stage, reply):
    address = "news@example.com" if stage == "mail" else "user0@example.com"
    smtp_server.set_fault(address, stage, reply, times=1)
    _, listener = run(smtp_server, make_items(3), send=send_options(connections=1))
    finals = assert_consistent(listener, range(3))
    assert all(r.status == Status.SENT for r in finals.values())
    assert finals[0].attempts == 2 and listener.results(0)[0].smtp_code == int(reply[:3])
    assert len(smtp_server.messages) == 3
    assert_no_duplicates(smtp_server)


def test_a_retry_waits_in_the_heap_without_holding_up_the_others(smtp_server):
    smtp_server.set_fault("user0@example.com", "rcpt", "451 4.7.1 greylisted", times=1)
    started = time.monotonic()
    stats, listener = run(
        smtp_server, make_items(30), send=send_options(connections=1, retry_backoff=0.3), rng=lambda: 0.0
    )
    elapsed = time.monotonic() - started
    assert stats.sent == 30
    # The only connection carried the 29 others while user0 waited for its retry.
    assert smtp_server.messages[-1].rcpt_tos == ["user0@example.com"]
    assert 0.3 <= elapsed < 2


def test_temporary_failures_end_deferred_after_the_last_retry(smtp_server):
    smtp_server.set_fault("user0@example.com", "rcpt", "450 4.2.0 mailbox busy")
    _, listener = run(smtp_server, make_items(1), send=send_options(retries=2))
    final = assert_consistent(listener, [0])[0]
    assert (final.status, final.final, final.attempts, final.smtp_code) == (Status.DEFERRED, True, 3, 450)
    assert [r.final for r in listener.results(0)] == [False, False, True]
    assert len(smtp_server.rcpt_attempts) == 3 and smtp_server.messages == []


@pytest.mark.parametrize(
    "stage,reply,hard",
    [
        ("rcpt", "550 5.1.1 <user0@example.com>: Recipient address rejected: User unknown", True),
        ("rcpt", "554 delivery error: dd This user doesn't have a yahoo.com account (user0@example.com) [0]", True),
        ("rcpt", "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using Spamhaus", False),
        ("data", "552 5.3.4 Message too big", False),
        ("mail", "553 5.7.1 Sender address rejected: not owned by user", False),
    ],
)
def test_permanent_failures_are_recorded_once_and_never_retried(smtp_server, stage, reply, hard):
    smtp_server.set_fault("news@example.com" if stage == "mail" else "user0@example.com", stage, reply)
    stats, listener = run(smtp_server, make_items(2), send=send_options(connections=1))
    finals = assert_consistent(listener, [0, 1])
    failed = finals[0]
    assert (failed.status, failed.final, failed.attempts) == (Status.FAILED, True, 1)
    assert failed.smtp_code == int(reply[:3]) and failed.smtp_reply == reply[4:]
    assert len(listener.results(0)) == 1
    assert is_hard_bounce(failed.smtp_code, failed.smtp_reply) is hard
    if stage != "mail":
        assert [a for _, a in smtp_server.rcpt_attempts].count("user0@example.com") == 1
        assert finals[1].status == Status.SENT
    assert stats.retries == 0


def test_a_final_reply_that_never_comes_is_an_unknown_outcome_and_never_retried(smtp_server):
    """The relay took the whole message and its 250 is late past the final-reply time:
    it may have queued it (RFC 1047), so a retry would risk a second copy."""
    items = make_items(3)
    smtp_server.set_fault("user1@example.com", "data", reply="250 2.0.0 OK: queued late", stall=2.0, times=1)
    smtp = smtp_for(smtp_server, timeout=5.0, data_timeout=0.4)

    stats, listener = run(smtp_server, items, smtp=smtp, send=send_options(retries=3))

    finals = assert_consistent(listener, [0, 1, 2])
    assert finals[1].status == Status.SENDING and finals[1].final and finals[1].attempts == 1
    assert "no reply within 0.4 s after the end of the message" in finals[1].smtp_reply
    assert [e for e in listener.for_key(1) if e[0] == "sending"] == listener.for_key(1)[:1]  # one attempt only
    assert finals[0].status == finals[2].status == Status.SENT
    assert (stats.sent, stats.unknown, stats.deferred) == (2, 1, 0)
    time.sleep(2.0)  # whatever the relay did with it, no second copy was sent
    assert len(smtp_server.received_by("user1@example.com")) <= 1
    assert_no_duplicates(smtp_server)


def test_the_final_reply_gets_the_data_timeout_not_the_command_timeout(smtp_server):
    items = make_items(2)
    smtp_server.set_fault("user0@example.com", "data", reply="250 2.0.0 OK: scanned", stall=1.0, times=1)
    smtp = smtp_for(smtp_server, timeout=0.4, data_timeout=5.0)

    stats, listener = run(smtp_server, items, smtp=smtp, send=send_options(retries=3))

    finals = assert_consistent(listener, [0, 1])
    assert finals[0].status == Status.SENT and finals[0].attempts == 1  # waited, did not give up
    assert stats.retries == 0
    assert len(smtp_server.received_by("user0@example.com")) == 1
    assert_no_duplicates(smtp_server)


def test_421_defers_and_reconnects(smtp_server):
    smtp_server.set_fault("user1@example.com", "rcpt", "421 4.7.0 too many messages, closing", times=1)
    stats, listener = run(smtp_server, make_items(3), send=send_options(connections=1))
    finals = assert_consistent(listener, range(3))
    assert all(r.status == Status.SENT for r in finals.values())
    assert finals[1].attempts == 2 and listener.results(1)[0].smtp_code == 421
    # The 421 closed the first connection: the retry and the rest went on a new one.
    by_recipient = {m.rcpt_tos[0]: m.connection for m in smtp_server.messages}
    assert by_recipient["user0@example.com"] == 1
    assert by_recipient["user1@example.com"] == by_recipient["user2@example.com"] == 2
    assert stats.connections_opened == 2


@pytest.mark.parametrize("notice", [None, "421 4.4.2 idle timeout exceeded"])
def test_stale_connection_is_recovered_without_counting_an_attempt(smtp_server, notice):
    smtp_server.close_connections_after(1, notice=notice)
    stats, listener = run(smtp_server, make_items(5), send=send_options(connections=1))
    finals = assert_consistent(listener, range(5))
    assert all(r.status == Status.SENT and r.attempts == 1 for r in finals.values())
    assert len(smtp_server.messages) == 5
    assert_no_duplicates(smtp_server)
    assert stats.stale_reconnects == 4 and stats.retries == 0 and stats.attempts == 5
    assert smtp_server.connections == 5


def test_relay_idle_timeout_between_messages_is_survived(make_smtp_server):
    server = make_smtp_server(idle_timeout=0.2)
    items = make_items(3)

    def slowly():
        for item in items:
            yield item
            time.sleep(0.4)  # longer than the relay keeps an idle connection

    stats, listener = run(server, slowly(), send=send_options(connections=1))
    finals = assert_consistent(listener, range(3))
    assert all(r.status == Status.SENT and r.attempts == 1 for r in finals.values())
    assert stats.stale_reconnects == 2 and server.connections == 3
    assert_no_duplicates(server)


def test_503_on_a_pooled_connection_means_stale(smtp_server):
    smtp_server.set_fault("news@example.com", "mail", "503 5.5.1 Error: nested MAIL command", reused_only=True, times=1)
    stats, listener = run(smtp_server, make_items(3), send=send_options(connections=1))
    finals = assert_consistent(listener, range(3))
    assert all(r.status == Status.SENT and r.attempts == 1 for r in finals.values())
    assert stats.stale_reconnects == 1 and len(smtp_server.messages) == 3
    assert_no_duplicates(smtp_server)


def test_drop_before_data_is_retried(smtp_server):
    smtp_server.set_fault("user0@example.com", "rcpt", drop=True, times=1)
    stats, listener = run(smtp_server, make_items(2), send=send_options(connections=1))
    finals = assert_consistent(listener, [0, 1])
    assert all(r.status == Status.SENT for r in finals.values())
    # On a fresh connection a drop is not a stale pool entry: it counts as an attempt.
    assert finals[0].attempts == 2
    first = listener.results(0)[0]
    assert (first.status, first.final, first.smtp_code) == (Status.DEFERRED, False, None)
    assert "closed the connection" in first.smtp_reply
    assert len(smtp_server.received_by("user0@example.com")) == 1


def test_drop_after_data_is_an_unknown_outcome_and_retried(smtp_server):
    smtp_server.set_fault("user0@example.com", "data", drop=True, times=1)
    _, listener = run(smtp_server, make_items(1))
    first, final = listener.results(0)
    assert (first.status, first.final) == (Status.DEFERRED, False)
    assert "may have accepted" in first.smtp_reply
    assert (final.status, final.attempts) == (Status.SENT, 2)
    assert len(smtp_server.received_by("user0@example.com")) == 1


def test_stall_times_out_and_ends_deferred(smtp_server):
    smtp_server.set_fault("user0@example.com", "rcpt", stall=1.5)
    started = time.monotonic()
    stats, listener = run(
        smtp_server, make_items(3), smtp=smtp_for(smtp_server, timeout=0.3), send=send_options(retries=1)
    )
    finals = assert_consistent(listener, range(3))
    assert (finals[0].status, finals[0].final, finals[0].attempts) == (Status.DEFERRED, True, 2)
    assert "timed out" in finals[0].smtp_reply
    assert finals[1].status == finals[2].status == Status.SENT
    assert stats.stale_reconnects == 0  # a timeout is never mistaken for a stale connection
    assert time.monotonic() - started < 5


def test_connection_refused_is_temporary_not_fatal():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now.
    listener = RecordingListener()
    stats = deliver(
        make_items(2),
        smtp=SMTPConfig(host="127.0.0.1", port=port, security="none", timeout=2),
        send=send_options(retries=2),
        password=None,
        listener=listener,
        stop=threading.Event(),
    )
    finals = listener.finals()
    assert finals  # one or both (two connections) probed the relay
    for result in finals.values():
        assert (result.status, result.final, result.attempts) == (Status.DEFERRED, True, 3)
        assert result.smtp_reply == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert listener.sending_keys() == set()  # no transaction ever started
    assert stats.deferred == len(finals) and stats.connections_opened == 0
    # Once every attempt in a row failed to connect, the run stopped handing out
    # messages: the other one was never tried, or waits for its retry (deferred).
    assert stats.deferred + stats.waiting_retry + stats.untouched == 2
    assert stats.unreachable == f"cannot connect to 127.0.0.1:{port}: connection refused (3 attempts)"


def test_a_relay_that_comes_back_gets_the_messages_that_waited():
    """While the relay refuses connections, new messages wait for the retry that probes
    it; when it answers again, they all go, nobody deferred."""
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    received: list[str] = []
    relays: list[Controller] = []

    class Handler:
        async def handle_DATA(self, smtp, session, envelope):
            received.extend(envelope.rcpt_tos)
            return "250 OK"

    def start_relay_on_first_failure(item, result):
        if not relays and not result.final:  # it comes up before the retry is due
            relay = Controller(Handler(), hostname="127.0.0.1", port=port)
            relay.start()
            relays.append(relay)

    try:
        stats = deliver(
            make_items(20),
            smtp=SMTPConfig(host="127.0.0.1", port=port, security="none", timeout=2),
            send=send_options(retries=3, retry_backoff=0.3, connections=2),
            password=None,
            listener=RecordingListener(on_result=start_relay_on_first_failure),
            stop=threading.Event(),
        )
    finally:
        for relay in relays:
            relay.stop()
    assert stats.sent == 20 and stats.deferred == 0 and stats.unreachable is None, stats
    assert sorted(received) == sorted(f"user{n}@example.com" for n in range(20))


# --------------------------------------------------------------------------------------
# TLS and AUTH


def test_starttls_with_verification_and_login(make_smtp_server, client_tls_context):
    server = make_smtp_server(starttls=True, password=PASSWORD)
    smtp = smtp_for(server, security="starttls", username=TEST_USERNAME)
    stats, listener = run(server, make_items(3), smtp=smtp, password=PASSWORD, ssl_context=client_tls_context)
    assert {r.status for r in assert_consistent(listener, range(3)).values()} == {Status.SENT}
    assert server.auth_attempts == [(TEST_USERNAME, True)] * server.connections


def test_starttls_untrusted_certificate_is_fatal(make_smtp_server):
    server = make_smtp_server(starttls=True)
    listener = RecordingListener()
    with pytest.raises(ConnectionSetupError) as caught:
        run(server, make_items(3), smtp=smtp_for(server, security="starttls"), listener=listener)
    assert caught.value.exit_code == ExitCode.USAGE
    assert "certificate" in str(caught.value) and "tls_verify" in str(caught.value)
    assert listener.events == [] and server.messages == []


def test_tls_verify_false_accepts_the_untrusted_certificate(make_smtp_server):
    server = make_smtp_server(starttls=True)
    smtp = smtp_for(server, security="starttls", tls_verify=False)
    assert tls_verification_warning(smtp) == TLS_VERIFY_DISABLED_WARNING
    stats, _ = run(server, make_items(2), smtp=smtp)
    assert stats.sent == 2


def test_missing_starttls_is_fatal(smtp_server):
    with pytest.raises(ConnectionSetupError) as caught:
        run(smtp_server, make_items(2), smtp=smtp_for(smtp_server, security="starttls"))
    assert "does not offer STARTTLS" in str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE
    assert smtp_server.messages == []


def test_implicit_tls(make_smtp_server, client_tls_context):
    server = make_smtp_server(implicit_tls=True)
    stats, _ = run(server, make_items(3), smtp=smtp_for(server, security="tls"), ssl_context=client_tls_context)
    assert stats.sent == 3
    with pytest.raises(ConnectionSetupError, match="certificate"):
        run(server, make_items(1), smtp=smtp_for(server, security="tls"))
    probe = probe_relay(smtp_for(server, security="tls"), password=None, ssl_context=client_tls_context)
    assert probe.ok and probe.tls_version.startswith("TLS")
    probe = probe_relay(smtp_for(server, security="tls"), password=None)
    assert [(s.name, s.ok) for s in probe.steps] == [("connect", True), ("tls", False)]


def test_login_rejected_is_fatal_and_never_shows_the_password(make_smtp_server, client_tls_context, caplog):
    server = make_smtp_server(starttls=True, password="the-right-one")
    # A careless relay that echoes what it got must not leak it through us either.
    plain = base64.b64encode(f"\0{TEST_USERNAME}\0{PASSWORD}".encode()).decode()
    server.auth_reject_reply = f"535 5.7.8 bad credentials {PASSWORD} {plain}"
    smtp = smtp_for(server, security="starttls", username=TEST_USERNAME, password_env="MAILER_TEST_PW")
    listener = RecordingListener()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConnectionSetupError) as caught:
        run(server, make_items(5), smtp=smtp, password=PASSWORD, listener=listener, ssl_context=client_tls_context)
    error = caught.value
    assert error.exit_code == ExitCode.USAGE
    assert "rejected the login" in str(error) and "MAILER_TEST_PW" in str(error)
    texts = [str(error), repr(error), error.message, str(error.hint), repr(listener.events)]
    texts += [r.getMessage() for r in caplog.records if r.name.startswith("mailer")]
    for text in texts:
        assert PASSWORD not in text and plain not in text
        assert base64.b64encode(PASSWORD.encode()).decode() not in text
    assert server.messages == [] and listener.events == []

    probe = probe_relay(smtp, password=PASSWORD, ssl_context=client_tls_context)
    assert not probe.ok and probe.steps[-1].name == "auth"
    assert all(PASSWORD not in s.detail and plain not in s.detail for s in probe.steps)


def test_results_and_stats_never_contain_the_password(make_smtp_server, client_tls_context):
    server = make_smtp_server(starttls=True, password=PASSWORD)
    server.set_fault("user1@example.com", "rcpt", "550 5.1.1 no such user")
    smtp = smtp_for(server, security="starttls", username=TEST_USERNAME)
    stats, listener = run(server, make_items(3), smtp=smtp, password=PASSWORD, ssl_context=client_tls_context)
    assert stats.sent == 2 and stats.failed == 1
    assert PASSWORD not in repr(listener.events) + repr(stats)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_over_plaintext_to_loopback_is_allowed(make_smtp_server):
    server = make_smtp_server(password=PASSWORD, auth_require_tls=False)
    smtp = smtp_for(server, username=TEST_USERNAME)
    stats, _ = run(server, make_items(2), smtp=smtp, password=PASSWORD)
    assert stats.sent == 2 and server.auth_attempts[0] == (TEST_USERNAME, True)


def test_login_over_plaintext_to_a_remote_host_is_refused_before_connecting(monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a connection was attempted")

    # A guard, not a fake: if the refusal ever came too late, nothing leaves the machine.
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    smtp = SMTPConfig(host="192.0.2.1", port=25, security="none", username="someone")
    with pytest.raises(ConnectionSetupError) as caught:
        deliver(
            make_items(1),
            smtp=smtp,
            send=send_options(),
            password=PASSWORD,
            listener=RecordingListener(),
            stop=threading.Event(),
        )
    assert caught.value.exit_code == ExitCode.USAGE
    assert "unencrypted" in str(caught.value) and PASSWORD not in str(caught.value)
    assert attempts == []


@pytest.mark.parametrize(
    "host,security,password,refused",
    [
        ("smtp.example.com", "none", "pw", True),
        ("192.0.2.1", "none", "pw", True),
        ("127.0.0.1", "none", "pw", False),
        ("127.8.9.10", "none", "pw", False),
        ("::1", "none", "pw", False),
        ("[::1]", "none", "pw", False),
        ("localhost", "none", "pw", False),
        ("LOCALHOST.", "none", "pw", False),
        ("localhost.example.com", "none", "pw", True),
        ("smtp.example.com", "starttls", "pw", False),
        ("smtp.example.com", "tls", "pw", False),
        ("smtp.example.com", "starttls", None, True),  # username without a password
    ],
)
def test_check_relay_settings(host, security, password, refused):
    smtp = SMTPConfig(host=host, security=security, username="u", password_env="PW")
    if refused:
        with pytest.raises(ConnectionSetupError) as caught:
            check_relay_settings(smtp, password)
        assert caught.value.exit_code == ExitCode.USAGE
    else:
        check_relay_settings(smtp, password)
    check_relay_settings(SMTPConfig(host=host, security=security), None)  # no login: always fine


def test_is_loopback_host():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("localhost") and is_loopback_host("::1")
    assert not is_loopback_host("10.0.0.1") and not is_loopback_host("mail.localhost.example")


@pytest.mark.parametrize(
    "address,local",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 loopback peer on a dual-stack socket
        ("192.0.2.1", False),
        ("10.0.0.1", False),
        ("::ffff:192.0.2.1", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a name is never proof: only an address
        ("", False),
    ],
)
def test_is_loopback_address_decides_by_the_peer_address(address, local):
    assert is_loopback_address(address) is local


def test_no_auth_in_clear_text_when_the_peer_is_not_this_machine(make_smtp_server):
    """The name passed (it could be "localhost." that DNS sent elsewhere): the address
    the socket is connected to decides, before AUTH, on a real connection."""
    server = make_smtp_server(password=PASSWORD, auth_require_tls=False)
    smtp = SMTPConfig(
        host="127.0.0.1", port=server.port, security="none", username=TEST_USERNAME, password_env="PW", timeout=5
    )
    check_relay_settings(smtp, PASSWORD)  # the name is fine
    seen: list[str] = []

    def remote(address: str) -> bool:
        seen.append(address)
        return False  # as if the name had resolved to another machine

    setup = Setup(smtp, PASSWORD, None)
    setup.peer_is_local = remote  # type: ignore[method-assign]
    with pytest.raises(ConnectionSetupError) as caught:
        setup.open()
    assert caught.value.exit_code == ExitCode.USAGE
    assert "unencrypted" in str(caught.value) and "connected to 127.0.0.1" in str(caught.value)
    assert seen == ["127.0.0.1"]  # asked about the socket's peer
    assert server.auth_attempts == []  # AUTH never reached the server
    assert PASSWORD not in str(caught.value)

    # The same relay with the real check: it is this machine, the login goes through.
    client = Setup(smtp, PASSWORD, None).open()
    client.quit()
    assert server.auth_attempts == [(TEST_USERNAME, True)]


# --------------------------------------------------------------------------------------
# SMTPUTF8


def utf8_item(key="u") -> Outgoing:
    data = "From: news@example.com\r\nTo: jöran@example.com\r\nSubject: héllo\r\n\r\nhallå\r\n".encode()
    return Outgoing(
        key=key,
        sender="news@example.com",
        recipients=["jöran@example.com"],
        data=data,
        message_id="<u@example.com>",
        smtputf8=True,
    )


def test_smtputf8_used_when_offered(smtp_server):
    item = utf8_item()
    stats, listener = run(smtp_server, [item])
    assert listener.finals()["u"].status == Status.SENT
    (message,) = smtp_server.messages
    assert message.rcpt_tos == ["jöran@example.com"] and message.data == item.data
    assert "SMTPUTF8" in message.mail_options and "BODY=8BITMIME" in message.mail_options


def test_smtputf8_missing_fails_that_item_without_a_transaction(make_smtp_server):
    server = make_smtp_server(smtputf8=False)
    items = [utf8_item(), *make_items(2)]
    _, listener = run(server, items, send=send_options(connections=1))
    finals = assert_consistent(listener, ["u", 0, 1])
    assert finals["u"].status == Status.FAILED and finals["u"].final
    assert finals["u"].smtp_reply == "the relay does not support SMTPUTF8, needed for jöran@example.com"
    assert "u" not in listener.sending_keys()
    assert finals[0].status == finals[1].status == Status.SENT
    assert all(r != "jöran@example.com" for _, r in server.rcpt_attempts)


# --------------------------------------------------------------------------------------
# Stop, errors, memory, rate


def test_stop_lets_in_flight_finish_and_leaves_the_rest_untouched(smtp_server):
    stop = threading.Event()
    pulled = []
    items = make_items(200)

    def lazily():
        for item in items:
            pulled.append(item.key)
            yield item

    def after_result(item, result):
        if sum(1 for e in listener.events if e[0] == "result") >= 5:
            stop.set()

    listener = RecordingListener(on_result=after_result)
    stats, _ = run(smtp_server, lazily(), listener=listener, stop=stop, queue_size=5)
    assert stats.interrupted
    assert len(pulled) < 30  # it stopped taking items from the iterator
    assert stats.items == len(pulled)
    finals = listener.finals()
    assert listener.sending_keys() == set(finals)  # everything started was finished
    assert stats.sent == len(finals) == len(smtp_server.messages)
    assert stats.sent + stats.untouched == stats.items
    assert smtp_server.quits == smtp_server.connections


def test_stop_does_not_start_retries(smtp_server):
    smtp_server.set_fault("user0@example.com", "rcpt", "451 4.3.0 try later")
    stop = threading.Event()
    listener = RecordingListener(on_result=lambda item, result: result.final or stop.set())
    started = time.monotonic()
    stats, _ = run(smtp_server, make_items(1), listener=listener, stop=stop, send=send_options(retry_backoff=30))
    assert time.monotonic() - started < 3
    (only,) = listener.results(0)
    assert (only.status, only.final) == (Status.DEFERRED, False)
    assert stats.waiting_retry == 1 and stats.interrupted
    assert len(smtp_server.rcpt_attempts) == 1


def test_stop_interrupts_a_slow_rate_wait(smtp_server):
    stop = threading.Event()
    listener = RecordingListener(on_result=lambda item, result: stop.set())
    started = time.monotonic()
    stats, _ = run(
        smtp_server, make_items(5), listener=listener, stop=stop, send=send_options(rate="1/min", connections=2)
    )
    assert time.monotonic() - started < 3
    assert stats.sent == 1 and stats.untouched == 4


def test_a_listener_error_stops_the_run_and_comes_out(smtp_server):
    class DiskFull(Exception):
        pass

    def on_sending(item, attempt):
        if item.key == 3:
            raise DiskFull("send log: disk full")

    listener = RecordingListener(on_sending=on_sending)
    with pytest.raises(DiskFull):
        run(smtp_server, make_items(20), listener=listener, send=send_options(connections=1))
    assert "user3@example.com" not in [r for _, r in smtp_server.rcpt_attempts]
    assert len(smtp_server.messages) == 3


def test_an_error_in_the_items_lets_in_flight_messages_finish(smtp_server):
    def broken():
        yield from make_items(3)
        raise ValueError("template error in row 4")

    listener = RecordingListener()
    with pytest.raises(ValueError, match="row 4"):
        run(smtp_server, broken(), listener=listener)
    assert listener.sending_keys() == set(listener.finals())


def test_memory_stays_bounded_by_the_queue_size(smtp_server):
    state = {"pulled": 0, "done": 0, "worst": 0}
    items = make_items(100)

    def lazily():
        for item in items:
            state["pulled"] += 1
            yield item

    def on_sending(item, attempt):
        state["worst"] = max(state["worst"], state["pulled"] - state["done"])

    def on_result(item, result):
        state["done"] += result.final

    listener = RecordingListener(on_sending=on_sending, on_result=on_result)
    stats, _ = run(smtp_server, lazily(), listener=listener, queue_size=4)
    assert stats.sent == 100
    assert state["worst"] <= 4 + 1  # the queue, plus the one item the feeder holds


def test_memory_stays_bounded_by_bytes_for_large_messages(smtp_server, monkeypatch):
    # Messages of ~100 KB with a 1 MB byte bound: at most about ten held at once, far
    # below the queue size of 1,000 messages.
    monkeypatch.setattr(delivery_module, "_MAX_OUTSTANDING_BYTES", 1024 * 1024)
    body = ("x" * 998 + "\r\n").encode() * 100
    items = make_items(60, body=b"From: news@example.com\r\nSubject: big\r\n\r\n" + body)
    state = {"pulled": 0, "done": 0, "worst": 0}

    def lazily():
        for item in items:
            state["pulled"] += 1
            yield item

    listener = RecordingListener(
        on_sending=lambda item, attempt: state.update(worst=max(state["worst"], state["pulled"] - state["done"])),
        on_result=lambda item, result: state.update(done=state["done"] + result.final),
    )
    stats, _ = run(smtp_server, lazily(), listener=listener)
    assert stats.sent == 60
    assert state["worst"] <= 1024 * 1024 // len(items[0].data) + 2, state


def test_rate_is_never_exceeded_over_any_second_at_the_server(smtp_server):
    def max_in_any_second(times):
        times = sorted(times)
        return max(sum(1 for t in times[i:] if t <= start + 1.0) for i, start in enumerate(times))

    started = time.monotonic()
    stats, _ = run(smtp_server, make_items(60), send=send_options(rate="20/s", connections=4))
    elapsed = time.monotonic() - started
    assert stats.sent == 60
    assert max_in_any_second(smtp_server.mail_times) <= 21
    assert 2.8 < elapsed < 6  # 60 messages at 20/s: about 3 s, not a burst, not a crawl


# --------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    "code,expected",
    [
        (250, None),
        (354, None),
        (421, TemporaryDeliveryError),
        (451, TemporaryDeliveryError),
        (550, PermanentDeliveryError),
        (554, PermanentDeliveryError),
        (-1, TemporaryDeliveryError),
    ],
)
def test_classify_reply(code, expected):
    error = classify_reply(code, "text", recipient="a@example.com")
    if expected is None:
        assert error is None
    else:
        assert type(error) is expected and error.recipient == "a@example.com"
        assert error.smtp_code == (code if code > 0 else None)


def test_classify_exception():
    assert "timed out" in classify_exception(TimeoutError("timed out")).message
    import smtplib

    assert "closed" in classify_exception(smtplib.SMTPServerDisconnected("x")).message
    assert isinstance(classify_exception(ConnectionResetError(104, "reset")), TemporaryDeliveryError)
    assert closes_connection(421) and not closes_connection(451)


@pytest.mark.parametrize(
    "code,text,hard",
    [
        (550, "5.1.1 <a@example.com>: Recipient address rejected: User unknown in local recipient table", True),
        (550, "5.1.1 The email account that you tried to reach does not exist.", True),
        (553, "5.1.3 bad recipient address syntax", True),
        (551, "5.1.6 user has moved", True),
        (550, "5.2.1 The email account that you tried to reach is disabled.", True),
        (550, "Requested action not taken: mailbox unavailable", True),
        (550, "no such user here", True),
        (550, "5.1.8 Sender address rejected: Domain not found", False),  # the sender's fault
        (550, "5.7.1 mailbox unavailable: message rejected as spam", False),  # policy
        (554, "5.7.1 Service unavailable; Client host blocked", False),
        (552, "5.2.2 mailbox full", False),
        (450, "4.1.1 user unknown (for now)", False),
        (550, "5.7.26 unauthenticated email is not accepted", False),
        # Yahoo's "no such mailbox": a bare 554, no enhanced code.
        (554, "delivery error: dd This user doesn't have a yahoo.com account (a@yahoo.com) [0] - mta4.yahoo.com", True),
        (554, "delivery error: dd This user doesn't have an aol.com account (a@aol.com) [0] - mta1", True),
        (554, "5.7.1 delivery error: dd This user doesn't have a yahoo.com account", False),  # the code decides
        (554, "delivery error: dd This user doesn't have a yahoo.com account; IP blocked as spam", False),
        (554, "delivery error: dd Sorry your message to a@yahoo.com cannot be delivered", False),
        (554, "This user doesn't exist", False),  # a bare 554 is still not "no such user" by its text
        (452, "dd This user doesn't have a yahoo.com account", False),
    ],
)
def test_is_hard_bounce(code, text, hard):
    assert is_hard_bounce(code, text) is hard


# --------------------------------------------------------------------------------------
# probe_relay


def test_probe_relay_reports_each_step_and_sends_nothing(make_smtp_server, client_tls_context):
    server = make_smtp_server(starttls=True, password=PASSWORD)
    smtp = smtp_for(server, security="starttls", username=TEST_USERNAME)
    probe = probe_relay(smtp, password=PASSWORD, ssl_context=client_tls_context)
    assert probe.ok, probe.steps
    assert [s.name for s in probe.steps] == ["connect", "ehlo", "starttls", "ehlo", "auth"]
    assert {"PIPELINING", "SMTPUTF8", "8BITMIME", "SIZE", "AUTH"} <= set(probe.extensions)
    assert probe.auth_mechanisms == ["LOGIN", "PLAIN"] and probe.tls_version.startswith("TLS")
    assert server.mail_times == [] and server.messages == [] and server.quits == 1


def test_probe_relay_stops_at_the_failing_step(make_smtp_server):
    server = make_smtp_server(starttls=True)
    probe = probe_relay(smtp_for(server, security="starttls"), password=None)
    assert not probe.ok
    assert [(s.name, s.ok) for s in probe.steps] == [("connect", True), ("ehlo", True), ("starttls", False)]
    assert "certificate" in probe.steps[-1].detail

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    probe = probe_relay(SMTPConfig(host="127.0.0.1", port=port, security="none", timeout=2), password=None)
    assert [(s.name, s.ok) for s in probe.steps] == [("connect", False)]
    assert "cannot connect" in probe.steps[0].detail
