"""`mailer check` per stream: each source address's PTR, whether that name resolves back
(FCrDNS) and is the stream's helo (mailer.checks.reverse), and each named relay probed;
against the loopback DNS responder (tests/dns_fixtures.py, PTR answers) and real servers."""

from __future__ import annotations

import json

import pytest
from send_support import Project

from mailer.checks.dns import make_resolver
from mailer.checks.reverse import check_source_address


@pytest.fixture
def resolver(dns_server):
    return make_resolver(dns_server.config(timeout=2))


def ptr_zone(address: str, name: str) -> dict:
    import dns.reversename

    return {(dns.reversename.from_address(address).to_text(), "PTR"): [f"{name}."]}


def test_forward_confirmed_and_matching_helo_is_ok(dns_server, resolver):
    dns_server.set_zone({**ptr_zone("127.0.0.9", "mta1.acme.example"), ("mta1.acme.example", "A"): ["127.0.0.9"]})
    found = check_source_address(resolver, "127.0.0.9", helo="MTA1.acme.example.")
    assert (found.status, found.names, found.confirmed) == ("ok", ("mta1.acme.example",), ("mta1.acme.example",))
    assert "forward-confirmed" in found.detail and found.fix is None
    assert dns_server.count("9.0.0.127.in-addr.arpa", "PTR") == 1
    assert dns_server.count("mta1.acme.example", "A") == 1


def test_a_helo_that_is_not_the_ptr_name_is_a_warning(dns_server, resolver):
    dns_server.set_zone({**ptr_zone("127.0.0.9", "mta1.acme.example"), ("mta1.acme.example", "A"): ["127.0.0.9"]})
    found = check_source_address(resolver, "127.0.0.9", helo="mail.acme.example")
    assert found.status == "warn" and "helo mail.acme.example is not that name" in found.detail
    assert 'helo = "mta1.acme.example"' in found.fix
    unset = check_source_address(resolver, "127.0.0.9", helo=None)
    assert unset.status == "warn" and "sets no helo" in unset.detail


def test_a_ptr_name_that_does_not_resolve_back_fails(dns_server, resolver):
    dns_server.set_zone({**ptr_zone("127.0.0.9", "mta1.acme.example"), ("mta1.acme.example", "A"): ["127.0.0.10"]})
    found = check_source_address(resolver, "127.0.0.9", helo="mta1.acme.example")
    assert found.status == "fail" and "not forward-confirmed" in found.detail
    assert found.confirmed == () and "A record of 127.0.0.9" in found.fix


def test_no_ptr_record_fails(dns_server, resolver):
    dns_server.set_zone({("mta1.acme.example", "A"): ["127.0.0.9"]})
    found = check_source_address(resolver, "127.0.0.9", helo="mta1.acme.example")
    assert found.status == "fail" and "has no PTR record" in found.detail
    assert "PTR record to the stream's helo name (mta1.acme.example)" in found.fix


def test_ipv6_addresses_are_confirmed_with_aaaa(dns_server, resolver):
    address = "2001:db8::25"
    dns_server.set_zone({**ptr_zone(address, "mta6.acme.example"), ("mta6.acme.example", "AAAA"): ["2001:db8:0::25"]})
    found = check_source_address(resolver, address, helo="mta6.acme.example")
    assert found.status == "ok", found


def test_dns_that_does_not_answer_is_a_warning_not_a_failure(dns_server, resolver):
    dns_server.set_fault("9.0.0.127.in-addr.arpa", "servfail")
    found = check_source_address(resolver, "127.0.0.9", helo="mta1.acme.example")
    assert found.status == "warn" and "SERVFAIL" in found.detail


def test_mailer_check_reports_each_stream_address_and_probes_each_relay(tmp_path, make_smtp_server, dns_server):
    relay_a = make_smtp_server(host="127.0.0.2")
    project = Project(tmp_path, relay_a)
    dns_server.set_zone(
        {
            **ptr_zone("127.0.0.9", "mta1.acme.example"),
            ("mta1.acme.example", "A"): ["127.0.0.9"],
            **ptr_zone("127.0.0.10", "elsewhere.example"),
            ("elsewhere.example", "A"): ["127.0.0.11"],
        }
    )
    project.configure(
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 2},
        relays={"a": {"host": "127.0.0.2", "port": relay_a.port, "security": "none", "timeout": 5}},
        streams={
            "transactional": {
                "relays": ["a"],
                "source_addresses": ["127.0.0.9", "127.0.0.10", "127.0.0.12"],
                "helo": "mta1.acme.example",
            },
            "marketing": {"relays": ["a"]},
        },
    )
    outcome = project.cli("check", "--json")
    assert outcome.exit_code == 1, outcome  # two addresses fail
    checks = {(c["section"], c["name"]): c for c in json.loads(outcome.stdout)["checks"]}
    assert checks[("streams", "transactional 127.0.0.9")]["status"] == "ok"
    assert checks[("streams", "transactional 127.0.0.10")]["status"] == "fail"
    assert "not forward-confirmed" in checks[("streams", "transactional 127.0.0.10")]["detail"]
    assert checks[("streams", "transactional 127.0.0.12")]["status"] == "fail"
    assert "no PTR record" in checks[("streams", "transactional 127.0.0.12")]["detail"]
    assert checks[("streams", "marketing")]["status"] == "ok"
    assert checks[("smtp", "relay a: connect")]["status"] == "ok"
    assert checks[("smtp", "relay a: ehlo")]["status"] == "ok"
    # No stream uses [smtp] and one is named like the kind: [smtp] is not probed.
    assert "[smtp] is not used" in checks[("smtp", "connection")]["detail"]
    assert relay_a.messages == [] and relay_a.mail_times == []


def test_a_relay_that_is_down_fails_its_check(tmp_path, make_smtp_server, dns_server):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.3", 0))
        port = probe.getsockname()[1]
    project = Project(tmp_path, make_smtp_server())
    project.configure(
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 2},
        relays={"b": {"host": "127.0.0.3", "port": port, "security": "none", "timeout": 2}},
        streams={"other": {"relays": ["b"]}},
    )
    outcome = project.cli("check", "--json")
    assert outcome.exit_code == 1
    checks = {(c["section"], c["name"]): c for c in json.loads(outcome.stdout)["checks"]}
    assert checks[("smtp", "relay b: connect")]["status"] == "fail"
    assert "connection refused" in checks[("smtp", "relay b: connect")]["detail"]
    assert checks[("smtp", "relay b: connect")]["fix"]
    # [smtp] is the default route here (no stream named like the kind): still probed.
    assert checks[("smtp", "connect")]["status"] == "ok"
