"""CHUNKING (RFC 3030, BDAT) with PIPELINING, against the BDAT-capable loopback server
(tests/bdat_server.py): one write and one round trip per transaction, the DATA
fallback, and every failure mid-pipeline keeping the delivery rules (retried,
final, unknown, never sent twice)."""

from __future__ import annotations

import threading

import pytest
from bdat_server import BDATServer

from mailer.core.config import SendConfig, SMTPConfig
from mailer.core.outcomes import Outgoing, Result, Status
from mailer.delivery.pool import deliver


class Listener:
    thread_safe = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: dict[object, list[Result]] = {}
        self.sending: list[object] = []

    def on_sending(self, item: Outgoing, attempt: int) -> None:
        with self.lock:
            self.sending.append(item.key)

    def on_result(self, item: Outgoing, result: Result) -> None:
        with self.lock:
            self.results.setdefault(item.key, []).append(result)

    def final(self, key: object) -> Result:
        (final,) = [r for r in self.results[key] if r.final]
        return final


@pytest.fixture
def make_server():
    servers: list[BDATServer] = []

    def make(**options) -> BDATServer:
        server = BDATServer(**options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def items(count: int, *, recipients=None, body: bytes | None = None) -> list[Outgoing]:
    made = []
    for index in range(count):
        to = recipients or [f"user{index}@example.com"]
        data = (
            body
            or (
                f"From: news@example.com\r\nTo: {to[0]}\r\nSubject: hello {index}\r\n\r\n"
                f"Hi {index}\r\n.leading dot\r\n.\r\nbye\r\n"
            ).encode()
        )
        made.append(Outgoing(key=index, sender="news@example.com", recipients=list(to), data=data, message_id=None))
    return made


def run(server: BDATServer, outgoing, **send_options):
    options = {"rate": "unlimited", "connections": 1, "max_per_connection": 100, "retries": 2, "retry_backoff": 0.0}
    options.update(send_options)
    listener = Listener()
    stats = deliver(
        outgoing,
        smtp=SMTPConfig(host=server.host, port=server.port, security="none", timeout=3.0),
        send=SendConfig(**options),
        password=None,
        listener=listener,
        stop=threading.Event(),
    )
    return stats, listener


def assert_each_once(server: BDATServer) -> None:
    seen = [r for m in server.messages for r in m.rcpt_tos]
    assert len(seen) == len(set(seen)), "somebody received two copies"


def test_a_reused_connection_costs_one_round_trip_per_message(make_server):
    server = make_server()
    outgoing = items(6)
    stats, listener = run(server, outgoing)
    assert stats.sent == 6 and stats.connections_opened == 1 and stats.attempts == 6
    assert [m.command for m in server.messages] == ["BDAT"] * 6
    assert all(m.chunks == 1 for m in server.messages)
    # The first transaction shares its group with the EHLO reply's wait; every later
    # one is a single group of replies: MAIL, RCPT and BDAT LAST answered together.
    assert [m.round_trips for m in server.messages] == [1] * 6
    for item, message in zip(outgoing, server.messages):
        assert message.data == item.data  # as it is: no dot-stuffing, exact byte count
        assert f"SIZE={len(item.data)}" in message.mail_options
    commands = [line for _, line in server.commands if line.startswith("BDAT")]
    assert commands == [f"BDAT {len(i.data)} LAST" for i in outgoing]
    assert {listener.final(i).smtp_code for i in range(6)} == {250}


def test_without_chunking_the_transaction_uses_data_and_two_round_trips(make_server):
    server = make_server(chunking=False)
    outgoing = items(3)
    stats, _ = run(server, outgoing)
    assert stats.sent == 3
    assert [m.command for m in server.messages] == ["DATA"] * 3
    assert [m.round_trips for m in server.messages] == [2] * 3  # 354 first, then the content
    assert [m.data for m in server.messages] == [i.data for i in outgoing]  # dot-stuffing undone
    assert not any(line.startswith("BDAT") for _, line in server.commands)


def test_chunking_without_pipelining_sends_bdat_after_the_envelope(make_server):
    server = make_server(pipelining=False)
    outgoing = items(2, recipients=["a@example.com", "b@example.com"])
    stats, _ = run(server, outgoing)
    assert stats.sent == 2
    assert [m.command for m in server.messages] == ["BDAT", "BDAT"]
    assert [m.round_trips for m in server.messages] == [4, 4]  # MAIL, RCPT, RCPT, BDAT one by one
    assert server.messages[0].data == outgoing[0].data


def test_bare_newlines_and_a_missing_last_line_end_become_crlf(make_server):
    server = make_server()
    stats, _ = run(server, items(1, body=b"Subject: lf\n\nline one\nline two"))
    assert stats.sent == 1
    assert server.messages[0].data == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


def test_eight_bit_content_is_declared_8bitmime(make_server):
    server = make_server()
    run(server, items(1, body="Subject: é\r\n\r\nvoilà\r\n".encode()))
    assert "BODY=8BITMIME" in server.messages[0].mail_options


def test_a_refused_recipient_among_several_still_delivers_to_the_others(make_server):
    server = make_server()
    server.set_fault("rcpt", "550 5.1.1 no such user", address="b@example.com")
    stats, listener = run(server, items(1, recipients=["a@example.com", "b@example.com"]))
    result = listener.final(0)
    assert result.status is Status.SENT and "b@example.com: 550 5.1.1 no such user" in result.smtp_reply
    assert server.messages[0].rcpt_tos == ["a@example.com"]


def test_every_recipient_refused_is_final_and_the_session_stays_in_step(make_server):
    server = make_server()
    server.set_fault("rcpt", "550 5.1.1 no such user", address="user0@example.com")
    stats, listener = run(server, items(4))
    assert listener.final(0).status is Status.FAILED and listener.final(0).smtp_code == 550
    assert len(listener.results[0]) == 1  # never retried
    # The chunk was sent anyway, read and discarded by the relay (554 to the BDAT), and
    # the same connection carried the next messages.
    assert stats.sent == 3 and stats.connections_opened == 1
    assert [m.rcpt_tos for m in server.messages] == [[f"user{i}@example.com"] for i in (1, 2, 3)]
    assert sum(line.startswith("BDAT") for _, line in server.commands) == 4


@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        ("mail", "451 4.3.0 try later", Status.SENT),
        ("rcpt", "452 4.2.2 over quota", Status.SENT),
        ("data", "451 4.3.0 queue busy", Status.SENT),
        ("mail", "553 5.7.1 sender refused", Status.FAILED),
        ("data", "554 5.6.0 content rejected", Status.FAILED),
    ],
)
def test_refusals_mid_pipeline(make_server, stage, reply, status):
    server = make_server()
    server.set_fault(stage, reply, address="news@example.com" if stage == "mail" else "user0@example.com", times=1)
    stats, listener = run(server, items(3))
    final = listener.final(0)
    assert final.status is status
    if status is Status.SENT:
        assert final.attempts == 2 and listener.results[0][0].smtp_code == int(reply[:3])
    else:
        assert final.attempts == 1 and final.smtp_code == int(reply[:3])
    assert stats.sent == (3 if status is Status.SENT else 2)
    assert stats.connections_opened == 1  # a refusal is answered by RSET, the session goes on
    assert_each_once(server)


def test_421_to_a_rcpt_closes_the_connection_and_the_message_is_retried(make_server):
    server = make_server()
    server.set_fault("rcpt", "421 4.3.2 shutting down", address="user1@example.com", times=1)
    stats, listener = run(server, items(3))
    assert stats.sent == 3 and stats.connections_opened == 2
    assert listener.results[1][0].smtp_code == 421 and listener.final(1).attempts == 2
    assert_each_once(server)


def test_a_connection_dropped_before_the_final_reply_is_retried_with_the_doubt_noted(make_server):
    server = make_server()
    server.set_fault("data", drop=True, address="user0@example.com", times=1)
    stats, listener = run(server, items(2))
    first = listener.results[0][0]
    assert first.status is Status.DEFERRED and not first.final
    assert "the relay may have accepted it" in first.smtp_reply
    assert stats.sent == 2 and len(server.received_by("user0@example.com")) == 1


def test_a_connection_dropped_during_a_large_chunk_is_retried(make_server):
    server = make_server()
    server.set_fault("chunk", drop=True, address="user0@example.com", times=1)
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    body = body[:16] + (body[16:] * 8000)  # 8 MB: more than the socket buffers take at once
    stats, listener = run(server, items(1, body=body))
    first = listener.results[0][0]
    assert first.status is Status.DEFERRED and not first.final
    assert "while sending the message" in first.smtp_reply or "may have accepted it" in first.smtp_reply
    assert stats.sent == 1 and server.messages[0].data == body


def test_no_final_reply_is_an_unknown_outcome_never_retried(make_server):
    server = make_server()
    server.set_fault("data", silent=True, address="user0@example.com")
    smtp = SMTPConfig(host=server.host, port=server.port, security="none", timeout=3.0, data_timeout=0.5)
    listener = Listener()
    stats = deliver(
        items(1),
        smtp=smtp,
        send=SendConfig(rate="unlimited", connections=1, max_per_connection=10, retries=2, retry_backoff=0.0),
        password=None,
        listener=listener,
        stop=threading.Event(),
    )
    final = listener.final(0)
    assert final.status is Status.SENDING and "outcome unknown" in final.smtp_reply
    assert len(listener.results[0]) == 1 and stats.unknown == 1


@pytest.mark.parametrize("notice", [None, "421 4.4.2 idle timeout"])
def test_a_connection_the_relay_closed_while_idle_is_found_before_the_message_leaves(make_server, notice):
    server = make_server()
    server.close_connections_after(1, notice=notice)
    stats, listener = run(server, items(4))
    assert stats.sent == 4 and stats.attempts == 4  # the stale connections cost no attempt
    assert stats.stale_reconnects >= 1
    assert all(len(listener.results[i]) == 1 for i in range(4))
    assert len(server.messages) == 4 and server.connections == 4
    assert_each_once(server)
    # Nothing was written to a connection after its hang-up: one MAIL per message.
    assert sum(line.startswith("MAIL") for _, line in server.commands) == 4


def test_the_debug_trace_shows_a_bdat_chunk_by_its_size(make_server):
    server = make_server()
    lines: list[str] = []
    listener = Listener()
    (item,) = items(1, body=b"Subject: secret body\r\n\r\nthe text of the message\r\n")
    deliver(
        [item],
        smtp=SMTPConfig(host=server.host, port=server.port, security="none", timeout=3.0),
        send=SendConfig(rate="unlimited", connections=1, max_per_connection=10, retries=0, retry_backoff=0.0),
        password=None,
        listener=listener,
        stop=threading.Event(),
        trace=lines.append,
    )
    text = "".join(lines)
    assert f"C: BDAT {len(item.data)} LAST" in text
    assert f"(the message: {len(item.data)} bytes, the BDAT chunk, sent as it is)" in text
    assert "the text of the message" not in text and "secret body" not in text
    assert listener.final(0).status is Status.SENT
