"""Several relays in one pool (mailer.delivery.pool with relays=): weights, each relay's
rate and connections, a relay that is down and comes back, source addresses and HELO.

Every relay is a real aiosmtpd server on its own loopback address (127.0.0.2, 127.0.0.3,
... all route to lo); a relay that is down is a port where nothing listens, brought back
by starting a server on the same address and port.
"""

from __future__ import annotations

import socket
import threading
import time

from smtp_fixtures import TestSMTPServer
from test_delivery import RecordingListener, assert_consistent, make_items, send_options

from mailer.core.config import SMTPConfig
from mailer.core.errors import ConnectionSetupError, ExitCode
from mailer.core.outcomes import Status
from mailer.delivery.pool import deliver
from mailer.delivery.routes import Relay


def relay(name: str, server_or_host, port: int | None = None, **options) -> Relay:
    host = server_or_host if isinstance(server_or_host, str) else server_or_host.host
    port = port if port is not None else server_or_host.port
    smtp = {"host": host, "port": port, "security": "none", "timeout": 5.0}
    smtp.update(options.pop("smtp", {}))
    return Relay(name=name, smtp=SMTPConfig(**smtp), **options)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run_relays(relays, items, *, send=None, listener=None, **kwargs):
    listener = listener or RecordingListener()
    stats = deliver(
        items, relays=relays, send=send or send_options(), listener=listener, stop=threading.Event(), **kwargs
    )
    return stats, listener


def recipients(server) -> list[str]:
    with server.lock:
        return [address for message in server.messages for address in message.rcpt_tos]


def max_in_any_second(times) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t <= start + 1.0) for i, start in enumerate(times)), default=0)


def test_weights_share_the_messages_exactly(make_smtp_server):
    a = make_smtp_server(host="127.0.0.2")
    b = make_smtp_server(host="127.0.0.3")
    items = make_items(200)
    stats, listener = run_relays([relay("a", a, weight=3), relay("b", b, weight=1)], items)
    assert stats.sent == 200
    assert_consistent(listener, range(200))
    got_a, got_b = recipients(a), recipients(b)
    assert (len(got_a), len(got_b)) == (150, 50)
    assert stats.sent_by_relay == {"a": 150, "b": 50}
    assert sorted(got_a + got_b) == sorted(item.recipients[0] for item in items)  # each once
    assert all(result.attempts == 1 for result in listener.finals().values())


def test_each_relay_keeps_its_own_rate_and_connections_and_the_run_rate_caps_the_whole(make_smtp_server):
    a = make_smtp_server(host="127.0.0.2")
    b = make_smtp_server(host="127.0.0.3")
    c = make_smtp_server(host="127.0.0.4")
    relays = [
        relay("a", a, rate=4.0, connections=1),
        relay("b", b, connections=3),
        relay("c", c, connections=2),
    ]
    stats, _ = run_relays(relays, make_items(30), send=send_options(rate="12/s", connections=5))
    assert stats.sent == 30
    assert [len(recipients(server)) for server in (a, b, c)] == [10, 10, 10]
    # Measured at the servers: relay a never above its 4/s, the three together never above 12/s
    # (one message over in a window, as the contract allows, and one more for the servers'
    # own scheduling on a loaded machine: the arrival of a paced message can be late, never early).
    assert max_in_any_second(a.mail_times) <= 6
    every = sorted(a.mail_times + b.mail_times + c.mail_times)
    assert max_in_any_second(every) <= 14
    # Over the whole run the pace is exact: 30 messages at 12/s span at least 29/12 s.
    assert every[-1] - every[0] >= 29 / 12 - 0.1
    assert a.mail_times[-1] - a.mail_times[0] >= 9 / 4 - 0.1
    assert a.connections <= 1 and b.connections <= 3 and c.connections <= 2


def test_a_relay_that_is_down_is_skipped_and_nobody_is_counted_twice(make_smtp_server):
    a = make_smtp_server(host="127.0.0.2")
    down = relay("b", "127.0.0.3", free_port("127.0.0.3"))  # nothing listens there
    items = make_items(60)
    stats, listener = run_relays(
        [relay("a", a), down], items, send=send_options(retries=2, retry_backoff=30.0, connections=2)
    )
    assert stats.sent == 60 and stats.deferred == 0 and stats.unreachable is None
    assert sorted(recipients(a)) == sorted(item.recipients[0] for item in items)
    finals = assert_consistent(listener, range(60))
    # The messages whose connection to b failed went to a with no attempt counted and
    # no deferral reported: one "sending" and one final result each.
    assert all(result.attempts == 1 and result.status is Status.SENT for result in finals.values())
    assert [len(listener.results(key)) for key in range(60)] == [1] * 60
    assert sum(1 for event in listener.events if event[0] == "sending") == 60


def test_a_relay_that_comes_back_is_found_by_a_probe_and_gets_its_share_again(make_smtp_server):
    a = make_smtp_server(host="127.0.0.2")
    port = free_port("127.0.0.3")
    revived: list[TestSMTPServer] = []
    items = make_items(100)

    def bring_b_back(item, result):
        # Once the first ten went through a alone, b starts listening again.
        if result.final and not revived and len(recipients(a)) >= 10:
            revived.append(TestSMTPServer(host="127.0.0.3", port=port))

    try:
        stats, listener = run_relays(
            [relay("a", a), relay("b", "127.0.0.3", port)],
            items,
            send=send_options(rate="25/s", connections=2, retries=3, retry_backoff=0.2),
            listener=RecordingListener(on_result=bring_b_back),
            rng=lambda: 0.0,  # no jitter: probes 0.2, 0.4, 0.8 s apart
        )
        assert revived, "the test never brought b back"
        b = revived[0]
        assert stats.sent == 100 and stats.unreachable is None
        got_a, got_b = recipients(a), recipients(b)
        assert got_b, "the probe never found b back"
        assert sorted(got_a + got_b) == sorted(item.recipients[0] for item in items)
        assert len(set(got_a) & set(got_b)) == 0
        finals = assert_consistent(listener, range(100))
        assert all(result.attempts == 1 for result in finals.values())
        # Nothing was sent during the probe that found b back: every transaction b
        # saw carried a message of the list.
        assert len(b.messages) == len(got_b)
        (error, still_down), *_ = stats.relay_troubles.values()
        assert list(stats.relay_troubles) == ["b"] and not still_down and "connection refused" in error
    finally:
        for server in revived:
            server.stop()


def test_when_every_relay_is_down_the_run_gives_up_naming_each(make_smtp_server):
    ports = [free_port("127.0.0.2"), free_port("127.0.0.3")]
    stats, listener = run_relays(
        [relay("a", "127.0.0.2", ports[0]), relay("b", "127.0.0.3", ports[1])],
        make_items(10),
        send=send_options(retries=1, retry_backoff=0.01),
    )
    assert stats.sent == 0 and stats.untouched == 10
    assert listener.events == []  # nothing was attempted, so nothing is reported
    assert stats.unreachable is not None
    assert f"relay a: cannot connect to 127.0.0.2:{ports[0]}: connection refused" in stats.unreachable
    assert f"relay b: cannot connect to 127.0.0.3:{ports[1]}: connection refused" in stats.unreachable


def test_a_relay_that_refuses_the_login_is_skipped_while_another_works(make_smtp_server):
    a = make_smtp_server(host="127.0.0.2")
    b = make_smtp_server(host="127.0.0.3", password="right-Pa55word", auth_require_tls=False)
    b.auth_reject_reply = "535 5.7.8 bad credentials"
    b_with_wrong_password = relay(
        "b", b, password="wrong-Pa55word", smtp={"username": "mailer-test", "password_env": "B_PASSWORD"}
    )
    stats, listener = run_relays(
        [relay("a", a), b_with_wrong_password], make_items(20), send=send_options(retry_backoff=30.0)
    )
    assert stats.sent == 20 and len(recipients(a)) == 20 and b.messages == []
    assert all(result.attempts == 1 for result in assert_consistent(listener, range(20)).values())


def test_every_relay_refusing_the_login_ends_the_run_as_one_relay_would(make_smtp_server):
    servers = [
        make_smtp_server(host=host, password="right-Pa55word", auth_require_tls=False)
        for host in ("127.0.0.2", "127.0.0.3")
    ]
    for server in servers:
        server.auth_reject_reply = "535 5.7.8 bad credentials"
    relays = [
        relay(name, server, password="wrong-Pa55word", smtp={"username": "mailer-test", "password_env": "X"})
        for name, server in zip(("a", "b"), servers, strict=True)
    ]
    listener = RecordingListener()
    try:
        deliver(make_items(5), relays=relays, send=send_options(), listener=listener, stop=threading.Event())
    except ConnectionSetupError as exc:
        assert exc.exit_code == ExitCode.USAGE and "rejected the login" in exc.message
        assert "wrong-Pa55word" not in exc.message
    else:
        raise AssertionError("the run did not end with the setup error")
    assert listener.events == [] and all(server.messages == [] for server in servers)


def test_connections_leave_from_the_source_addresses_in_turn_with_the_helo(make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    stats, _ = run_relays(
        [relay("a", server)],
        make_items(40),
        send=send_options(connections=4, max_per_connection=5),
        source_addresses=["127.0.0.9", "127.0.0.10"],
        helo="mta1.acme.example",
    )
    assert stats.sent == 40
    peers = [peer for peer, _ in server.greetings]
    assert set(peers) == {"127.0.0.9", "127.0.0.10"}
    # In turn: the two addresses differ by at most one connection.
    assert abs(peers.count("127.0.0.9") - peers.count("127.0.0.10")) <= 1
    assert {name for _, name in server.greetings} == {"mta1.acme.example"}
    assert {message.peer for message in server.messages} == {"127.0.0.9", "127.0.0.10"}


def test_helo_defaults_to_the_relays_own_then_the_streams_wins(make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    run_relays([relay("a", server, smtp={"helo": "relay-own.example"})], make_items(2))
    assert {name for _, name in server.greetings} == {"relay-own.example"}
    server.greetings.clear()
    run_relays([relay("a", server, smtp={"helo": "relay-own.example"})], make_items(2), helo="stream.example")
    assert {name for _, name in server.greetings} == {"stream.example"}


def test_a_source_address_the_machine_does_not_have_is_a_connection_error_naming_it(make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    stats, listener = run_relays(
        [relay("a", server)],
        make_items(1),
        send=send_options(retries=0, connections=1),
        source_addresses=["192.0.2.77"],  # TEST-NET-1: never on this machine, so never bound
    )
    assert stats.deferred == 1 and server.connections == 0
    (result,) = listener.finals().values()
    assert "from 192.0.2.77" in result.smtp_reply


def test_one_relay_with_a_rate_of_its_own(make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    started = time.monotonic()
    stats, _ = run_relays([relay("a", server, rate=10.0, connections=3)], make_items(20))
    assert stats.sent == 20
    assert max_in_any_second(server.mail_times) <= 11
    assert time.monotonic() - started > 1.5  # 20 at 10/s: the relay's rate held, not a burst


def test_a_message_that_needs_smtputf8_goes_to_a_relay_that_offers_it(make_smtp_server):
    from mailer.core.outcomes import Outgoing

    plain = make_smtp_server(host="127.0.0.2", smtputf8=False)
    utf8 = make_smtp_server(host="127.0.0.3")
    items = make_items(20)
    items += [
        Outgoing(
            key=100 + n,
            sender="news@example.com",
            recipients=[f"zoë{n}@example.com"],
            data=items[0].data,
            message_id=f"<u{n}@example.com>",
            smtputf8=True,
        )
        for n in range(10)
    ]
    stats, listener = run_relays([relay("plain", plain, weight=3), relay("utf8", utf8)], items)
    assert stats.sent == 30 and stats.failed == 0
    assert not any(address.startswith("zoë") for address in recipients(plain))
    assert sorted(a for a in recipients(utf8) if a.startswith("zoë")) == sorted(
        f"zoë{n}@example.com" for n in range(10)
    )
    assert all(result.attempts == 1 for result in assert_consistent(listener, [*range(20), *range(100, 110)]).values())

    # No relay offers it: the message fails as with one relay, nothing sent.
    other = make_smtp_server(host="127.0.0.4", smtputf8=False)
    stats, listener = run_relays([relay("plain", plain), relay("other", other)], items[20:22])
    assert stats.failed == 2 and "does not support SMTPUTF8" in listener.finals()[100].smtp_reply
