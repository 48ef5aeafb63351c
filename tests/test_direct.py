"""The direct-delivery engine against real loopback servers: aiosmtpd on 127.0.0.x, the DNS responder."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from mailer.core.outcomes import Outgoing, Result, Status
from mailer.delivery.direct import DirectSettings, deliver_direct
from mailer.delivery.mx import MXResolver, make_async_resolver
from mailer.delivery.shaping import DomainLimit, Shaper


class Recorder:
    def __init__(self) -> None:
        self.final: dict[str, Result] = {}
        self.attempts: list[tuple[str, int]] = []
        self.interim: list[tuple[str, Result]] = []

    def on_sending(self, item, attempt: int) -> None:
        self.attempts.append((item.recipients[0], attempt))

    def on_result(self, item, result: Result) -> None:
        if result.final:
            assert item.recipients[0] not in self.final
            self.final[item.recipients[0]] = result
        else:
            self.interim.append((item.recipients[0], result))


def message(recipient: str) -> Outgoing:
    data = f"From: a@sender.test\r\nTo: {recipient}\r\nSubject: hi\r\n\r\nHello {recipient}\r\n".encode()
    return Outgoing(key=recipient, sender="a@sender.test", recipients=[recipient], data=data, message_id=recipient)


@pytest.fixture
def servers(make_smtp_server):
    """A factory of aiosmtpd servers that all listen on one port, each on its own 127.0.0.x."""
    state: dict = {"port": None}

    def make(host: str, **options):
        if state["port"] is None:
            server = make_smtp_server(host=host, **options)
            state["port"] = server.port
            return server
        return make_smtp_server(host=host, port=state["port"], **options)

    make.port = lambda: state["port"]  # type: ignore[attr-defined]
    return make


def run(dns_server, items, *, port: int, shaper: Shaper | None = None, **settings):
    recorder = Recorder()
    options = {"attempts": 3, "retry_delay": 0.1, "backoff_pause": 0.2, "max_wait": 30.0, "timeout": 10.0}
    options.update(settings)
    stats = deliver_direct(
        items,
        settings=DirectSettings(port=port, helo="mta.sender.test", **options),
        listener=recorder,
        resolver=MXResolver(make_async_resolver(dns_server.config(timeout=1.0)), rng=random.Random(3)),
        shaper=shaper or Shaper(),
        rng=lambda: 0.5,
    )
    return recorder, stats


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def test_routing_by_mx_with_failover_past_a_refused_host(dns_server, servers) -> None:
    primary = servers("127.0.0.3")
    other = servers("127.0.0.4")
    dns_server.set_zone(
        {
            # 127.0.0.5 has no server: connection refused, the next MX is tried.
            ("a.test", "MX"): ["5 dead.a.test.", "10 mx.a.test."],
            ("dead.a.test", "A"): ["127.0.0.5"],
            ("mx.a.test", "A"): ["127.0.0.3"],
            ("b.test", "MX"): ["10 mx.b.test."],
            ("mx.b.test", "A"): ["127.0.0.4"],
            ("c.test", "A"): ["127.0.0.4"],  # no MX: the A record
        }
    )
    items = [message(f"u{i}@a.test") for i in range(5)] + [message("x@b.test"), message("y@c.test")]
    recorder, stats = run(dns_server, items, port=servers.port())
    assert {r: res.status for r, res in recorder.final.items()} == {i.recipients[0]: Status.SENT for i in items}
    assert sorted(r for m in primary.messages for r in m.rcpt_tos) == [f"u{i}@a.test" for i in range(5)]
    assert sorted(r for m in other.messages for r in m.rcpt_tos) == ["x@b.test", "y@c.test"]
    assert all(len(m.rcpt_tos) == 1 for m in primary.messages)  # one recipient per transaction
    assert primary.greetings[0][1] == "mta.sender.test"
    assert stats.sent == 7


def test_four_xx_greeting_on_the_first_mx_moves_to_the_next(dns_server, servers) -> None:
    good = servers("127.0.0.3")
    port = servers.port()
    refuser = socket.socket()
    refuser.bind(("127.0.0.6", port))
    refuser.listen(8)
    greeted: list[int] = []

    def greet() -> None:
        while True:
            try:
                conn, _ = refuser.accept()
            except OSError:
                return
            greeted.append(1)
            conn.sendall(b"421 4.3.2 busy, try later\r\n")
            conn.close()

    threading.Thread(target=greet, daemon=True).start()
    try:
        dns_server.set_zone(
            {
                ("g.test", "MX"): ["10 busy.g.test.", "20 mx.g.test."],
                ("busy.g.test", "A"): ["127.0.0.6"],
                ("mx.g.test", "A"): ["127.0.0.3"],
            }
        )
        recorder, _ = run(dns_server, [message("a@g.test")], port=port)
    finally:
        refuser.close()
    assert recorder.final["a@g.test"].status == Status.SENT
    assert greeted and [m.rcpt_tos for m in good.messages] == [["a@g.test"]]


def test_null_mx_nxdomain_servfail_and_a_working_domain(dns_server, servers) -> None:
    good = servers("127.0.0.3")
    dns_server.set_zone(
        {
            ("null.test", "MX"): ["0 ."],
            ("broken.test", "MX"): ["10 mx.broken.test."],
            ("ok.test", "MX"): ["10 mx.ok.test."],
            ("mx.ok.test", "A"): ["127.0.0.3"],
        }
    )
    dns_server.set_fault("broken.test", "servfail")
    items = [message("a@null.test"), message("b@nowhere.test"), message("c@broken.test"), message("d@ok.test")]
    recorder, _ = run(dns_server, items, port=servers.port())
    final = recorder.final
    assert final["a@null.test"].status == Status.FAILED and "null MX" in final["a@null.test"].smtp_reply
    assert final["b@nowhere.test"].status == Status.FAILED and "NXDOMAIN" in final["b@nowhere.test"].smtp_reply
    assert final["c@broken.test"].status == Status.DEFERRED and "SERVFAIL" in final["c@broken.test"].smtp_reply
    assert final["d@ok.test"].status == Status.SENT
    assert [m.rcpt_tos for m in good.messages] == [["d@ok.test"]]


def test_connections_per_destination_are_held_at_the_server(dns_server, servers) -> None:
    slow = servers("127.0.0.3")
    slow.set_fault("*", "data", "250 2.0.0 OK slowly", stall=0.05)
    dns_server.set_zone({("s.test", "MX"): ["10 mx.s.test."], ("mx.s.test", "A"): ["127.0.0.3"]})
    shaper = Shaper(connections_per_domain=2)
    items = [message(f"u{i}@s.test") for i in range(20)]
    recorder, _ = run(dns_server, items, port=servers.port(), shaper=shaper)
    assert all(r.status == Status.SENT for r in recorder.final.values()) and len(recorder.final) == 20
    # Each connection's life at the server, from its first MAIL to its last message's end.
    spans: dict[int, list[float]] = {}
    for m in slow.messages:
        span = spans.setdefault(m.connection, [m.started, m.finished])
        span[0], span[1] = min(span[0], m.started), max(span[1], m.finished)
    overlap = max(sum(1 for a, b in spans.values() if a <= t <= b) for t, _ in spans.values())
    assert 1 <= overlap <= 2
    assert shaper.destinations[0].peak_active <= 2


def test_a_421_backs_off_that_destination_only(dns_server, servers) -> None:
    busy = servers("127.0.0.3")
    calm = servers("127.0.0.4")
    busy.set_fault("*", "mail", "421 4.7.0 Too many concurrent connections from your IP", times=1)
    dns_server.set_zone(
        {
            ("busy.test", "MX"): ["10 mx.busy.test."],
            ("mx.busy.test", "A"): ["127.0.0.3"],
            ("calm.test", "MX"): ["10 mx.calm.test."],
            ("mx.calm.test", "A"): ["127.0.0.4"],
        }
    )
    shaper = Shaper(connections_per_domain=3)
    items = [message(f"u{i}@busy.test") for i in range(3)] + [message(f"v{i}@calm.test") for i in range(6)]
    recorder, _ = run(dns_server, items, port=servers.port(), shaper=shaper)
    assert all(r.status == Status.SENT for r in recorder.final.values()) and len(recorder.final) == 9
    by_name = {d.name: d for d in shaper.destinations}
    assert by_name["busy.test"].backoffs == 1 and by_name["busy.test"].connections == 2
    assert by_name["calm.test"].backoffs == 0 and by_name["calm.test"].connections == 3
    assert len(calm.messages) == 6 and len(busy.messages) == 3
    assert any(r == "u0@busy.test" or r.endswith("@busy.test") for r, _ in recorder.interim)


def test_a_suspending_reply_defers_that_domain_now_and_others_go_on(dns_server, servers) -> None:
    yahoo = servers("127.0.0.3")
    other = servers("127.0.0.4")
    yahoo.set_fault(
        "*", "mail", "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to user complaints"
    )
    dns_server.set_zone(
        {
            ("yahoo.test", "MX"): ["1 mta5.am0.yahoodns.net.test."],
            ("mta5.am0.yahoodns.net.test", "A"): ["127.0.0.3"],
            ("fresh.test", "MX"): ["10 mx.fresh.test."],
            ("mx.fresh.test", "A"): ["127.0.0.4"],
        }
    )
    items = [message(f"y{i}@yahoo.test") for i in range(4)] + [message(f"f{i}@fresh.test") for i in range(4)]
    # One connection, so that the first reply is seen before any second MAIL could go out.
    shaper = Shaper(connections_per_domain=1)
    recorder, _ = run(dns_server, items, port=servers.port(), max_wait=60.0, shaper=shaper)
    for i in range(4):
        deferred = recorder.final[f"y{i}@yahoo.test"]
        assert deferred.status == Status.DEFERRED
        assert recorder.final[f"f{i}@fresh.test"].status == Status.SENT
    assert "TSS04" in recorder.final["y0@yahoo.test"].smtp_reply
    # Suspended for two hours after the first reply: no second MAIL in this run.
    assert len(yahoo.mail_times) == 1 and not yahoo.messages
    assert len(other.messages) == 4


def test_after_a_reputation_deferral_the_retry_leaves_from_another_source(dns_server, servers) -> None:
    server = servers("127.0.0.3")
    server.set_fault("*", "mail", "451 4.7.1 Service unavailable, try again later from another IP", times=1)
    dns_server.set_zone({("r.test", "MX"): ["10 mx.r.test."], ("mx.r.test", "A"): ["127.0.0.3"]})
    recorder, _ = run(
        dns_server, [message("a@r.test")], port=servers.port(), source_addresses=("127.0.0.9", "127.0.0.10")
    )
    assert recorder.final["a@r.test"].status == Status.SENT
    first_peer = server.greetings[0][0]
    assert [m.peer for m in server.messages] == [{"127.0.0.9": "127.0.0.10", "127.0.0.10": "127.0.0.9"}[first_peer]]


def test_greylisting_is_retried_in_the_run(dns_server, servers) -> None:
    server = servers("127.0.0.3")
    server.set_fault("a@grey.test", "rcpt", "450 4.2.0 Greylisted, come back later", times=1)
    dns_server.set_zone({("grey.test", "MX"): ["10 mx.grey.test."], ("mx.grey.test", "A"): ["127.0.0.3"]})
    recorder, stats = run(dns_server, [message("a@grey.test")], port=servers.port())
    assert recorder.final["a@grey.test"].status == Status.SENT
    assert recorder.final["a@grey.test"].attempts == 2 and stats.retries == 1
    assert [a for _, a in recorder.attempts] == [1, 2]


def test_retries_used_up_end_deferred_with_the_last_reply(dns_server, servers) -> None:
    server = servers("127.0.0.3")
    server.set_fault("*", "rcpt", "452 4.2.2 Mailbox full")
    dns_server.set_zone({("full.test", "MX"): ["10 mx.full.test."], ("mx.full.test", "A"): ["127.0.0.3"]})
    recorder, _ = run(dns_server, [message("a@full.test")], port=servers.port(), attempts=2)
    result = recorder.final["a@full.test"]
    assert result.status == Status.DEFERRED and result.smtp_code == 452 and "Mailbox full" in result.smtp_reply
    assert not server.messages


def test_opportunistic_starttls_with_an_unverifiable_certificate(dns_server, servers) -> None:
    server = servers("127.0.0.1", starttls=True)
    dns_server.set_zone({("tls.test", "MX"): ["10 mx.tls.test."], ("mx.tls.test", "A"): ["127.0.0.1"]})
    recorder, _ = run(dns_server, [message("a@tls.test")], port=servers.port(), tls="required")
    result = recorder.final["a@tls.test"]
    assert result.status == Status.SENT and "certificate not verified" in result.smtp_reply
    assert len(server.messages) == 1


def test_tls_required_refuses_to_send_in_clear(dns_server, servers) -> None:
    server = servers("127.0.0.3")  # no STARTTLS
    dns_server.set_zone({("clear.test", "MX"): ["10 mx.clear.test."], ("mx.clear.test", "A"): ["127.0.0.3"]})
    recorder, _ = run(dns_server, [message("a@clear.test")], port=servers.port(), tls="required", attempts=1)
    result = recorder.final["a@clear.test"]
    assert result.status == Status.DEFERRED and "not sent in clear" in result.smtp_reply
    assert not server.messages and server.mail_times == []


def test_a_slow_domain_does_not_hold_up_the_others(dns_server, servers) -> None:
    slow = servers("127.0.0.3")
    fast = servers("127.0.0.4")
    slow.set_fault("*", "data", "250 2.0.0 OK eventually", stall=1.5)
    dns_server.set_zone(
        {
            ("slow.test", "MX"): ["10 mx.slow.test."],
            ("mx.slow.test", "A"): ["127.0.0.3"],
            ("fast.test", "MX"): ["10 mx.fast.test."],
            ("mx.fast.test", "A"): ["127.0.0.4"],
        }
    )
    items = [message(f"s{i}@slow.test") for i in range(2)] + [message(f"f{i}@fast.test") for i in range(10)]
    recorder, _ = run(dns_server, items, port=servers.port(), shaper=Shaper(connections_per_domain=1))
    assert len(recorder.final) == 12 and all(r.status == Status.SENT for r in recorder.final.values())
    # Every fast message was accepted before the slow domain's first one was.
    assert max(m.finished for m in fast.messages) < min(m.finished for m in slow.messages)


def test_shaper_shares_provider_limits_by_mx_suffix_and_config_overrides() -> None:
    shaper = Shaper(connections_per_domain=4, domains=[DomainLimit("gmail.com", connections=9, rate=30.0)])
    gmail = shaper.destination("gmail.com", ["gmail-smtp-in.l.google.com"])
    assert shaper.destination("googlemail.com", []) is gmail
    assert shaper.destination("acme-workspace.test", ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]) is gmail
    assert (gmail.connections, gmail.rate) == (9, 30.0)
    yahoo = shaper.destination("aol.com", [])
    assert yahoo.name == "yahoo" and yahoo.per_connection == 20
    plain = shaper.destination("example.test", ["mx.example.test"])
    assert (plain.name, plain.connections, plain.rate) == ("example.test", 4, None)
    suffix = Shaper(domains=[DomainLimit("mx.corp.test", connections=1)])
    a = suffix.destination("one.test", ["in1.mx.corp.test"])
    assert suffix.destination("two.test", ["in2.mx.corp.test"]) is a and a.connections == 1


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_a_config_rule_with_a_trigger_acts_only_after_that_many_matching_replies(
    dns_server, servers, threshold: int
) -> None:
    from mailer.delivery.shaping import REPLY_RULES, ReplyRule

    slow = servers("127.0.0.3")
    slow.set_fault("*", "mail", "451 4.3.2 please slow down, sender")  # no built-in rule matches this
    dns_server.set_zone({("slow.test", "MX"): ["10 mx.slow.test."], ("mx.slow.test", "A"): ["127.0.0.3"]})
    rule = ReplyRule(r"please slow down", "suspend", 7200.0, threshold=threshold, period=3600.0)
    items = [message(f"s{i}@slow.test") for i in range(5)]
    recorder, _ = run(
        dns_server, items, port=servers.port(), max_wait=30.0, shaper=Shaper(connections_per_domain=1),
        rules=(rule, *REPLY_RULES),
    )  # fmt: skip
    assert {r.status for r in recorder.final.values()} == {Status.DEFERRED} and len(recorder.final) == 5
    # Each matching reply before the trigger was a transaction; the last one suspended the
    # domain for two hours (past max_wait), so the rest were deferred without another MAIL.
    assert len(slow.mail_times) == threshold
    assert all("please slow down" in r.smtp_reply for r in recorder.final.values())


def test_a_trigger_counts_only_the_matches_within_its_period() -> None:
    from mailer.delivery.shaping import Destination, ReplyRule

    rule = ReplyRule(r"slow down", "throttle", 600.0, connections=1, rate=0.5, threshold=3, period=60.0)
    destination = Destination("slow.test", connections=4, rate=None)
    assert not destination.apply(rule, 0.0, reason="451 slow down")
    assert not destination.apply(rule, 30.0, reason="451 slow down")
    # The first match is a minute old at 61 s: two within the period, not three.
    assert not destination.apply(rule, 61.0, reason="451 slow down")
    assert destination.connection_limit(61.0) == 4 and destination.rate_limit(61.0) is None
    assert destination.apply(rule, 62.0, reason="451 slow down")  # 30, 61, 62
    assert destination.connection_limit(62.0) == 1 and destination.rate_limit(62.0) == 0.5
    assert destination.connection_limit(662.0) == 4  # the throttle ended
    # After acting, the count starts again.
    assert not destination.apply(rule, 700.0, reason="451 slow down")
