"""Which stream carries a campaign (mailer.delivery.routes): --stream, else the stream named
like [message] kind, else [smtp]; unknown names are exit 2 with nothing sent."""

from __future__ import annotations

import json

import pytest
from send_support import Project, addresses, received_addresses
from smtp_fixtures import TEST_USERNAME

from mailer.core.config import parse_config
from mailer.core.errors import ExitCode, UsageError
from mailer.delivery.routes import SMTP_RELAY_NAME, relays_of, select_route


def config_of(text: str):
    import tomllib

    return parse_config(tomllib.loads(text), path=None)


ROUTES = """\
[smtp]
host = "smtp.example"

[message]
kind = "marketing"

[relays.a]
host = "a.example"
weight = 2
rate = "5/s"

[relays.b]
host = "b.example"

[streams.marketing]
relays = ["a", "b"]
helo = "mta1.acme.example"
source_addresses = ["127.0.0.9"]
return_path = "bounces+{token}@acme.example"

[streams.bulk]

[streams.mx]
direct = true
"""


def test_the_stream_named_like_the_kind_is_the_default():
    route = select_route(config_of(ROUTES))
    assert (route.stream, route.chosen_by) == ("marketing", "[message] kind")
    assert [relay.name for relay in route.relays] == ["a", "b"]
    assert (route.helo, route.source_addresses, route.verp) == ("mta1.acme.example", ("127.0.0.9",), True)
    assert route.describe() == "stream 'marketing' (relays a, b)"


def test_stream_flag_wins_and_a_stream_without_relays_uses_smtp():
    route = select_route(config_of(ROUTES), "bulk")
    assert (route.stream, route.chosen_by) == ("bulk", "--stream")
    assert [(relay.name, relay.smtp.host) for relay in route.relays] == [(SMTP_RELAY_NAME, "smtp.example")]
    assert route.describe() == "stream 'bulk' (relay smtp.example:587)"
    direct = select_route(config_of(ROUTES), "mx")
    assert direct.direct and direct.relays == ()


def test_no_stream_of_the_kind_means_the_smtp_relay():
    route = select_route(config_of(ROUTES.replace('kind = "marketing"', 'kind = "transactional"')))
    assert route.stream is None and route.relays[0].smtp.host == "smtp.example"
    assert route.describe() == "smtp.example:587 (starttls)" and not route.verp
    assert select_route(config_of('[smtp]\nhost = "x.example"\n')).stream is None


def test_an_unknown_stream_names_the_streams_that_exist():
    with pytest.raises(UsageError) as caught:
        select_route(config_of(ROUTES), "newsletter")
    assert caught.value.exit_code == ExitCode.USAGE
    assert "'newsletter'" in caught.value.message and "marketing, bulk, mx" in caught.value.message
    with pytest.raises(UsageError) as caught:
        select_route(config_of("[smtp]\n"), "newsletter")
    assert "defines no [streams.NAME]" in caught.value.message


def test_relays_of_carries_weights_rates_and_passwords_but_never_shows_them():
    route = select_route(config_of(ROUTES))
    a, b = relays_of(route, passwords={"a": "Sup3r-secret-pw"})
    assert (a.weight, a.rate, a.connections, a.password, a.section) == (2.0, 5.0, None, "Sup3r-secret-pw", "relays.a")
    assert (b.weight, b.rate, b.password) == (1.0, None, None)
    assert "Sup3r-secret-pw" not in repr(a)


# --- through the CLI, on real servers ------------------------------------------------------


def two_relays(tmp_path, make_smtp_server, **stream):
    a = make_smtp_server(host="127.0.0.2")
    b = make_smtp_server(host="127.0.0.3")
    project = Project(tmp_path, a)
    project.configure(
        smtp={"host": "127.0.0.4", "port": 9},  # nothing listens: a send through it would fail
        relays={
            "a": {"host": "127.0.0.2", "port": a.port, "security": "none", "timeout": 5},
            "b": {"host": "127.0.0.3", "port": b.port, "security": "none", "timeout": 5},
        },
        streams={"marketing": {"relays": ["a"], **stream}, "other": {"relays": ["b"]}},
    )
    return project, a, b


def test_send_goes_through_the_stream_of_its_kind_or_of_the_flag(tmp_path, make_smtp_server):
    project, a, b = two_relays(tmp_path, make_smtp_server)
    project.configure(message={"kind": "marketing", "list_unsubscribe_mailto": "u@acme.example"})
    project.write_contacts(addresses(3))
    outcome = project.send("--yes")
    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(a)) == addresses(3) and received_addresses(b) == []

    project.write_contacts(addresses(2, prefix="other"))
    outcome = project.send("--yes", "--stream", "other", "--campaign", "second")
    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(b)) == addresses(2, prefix="other")


def test_unknown_stream_is_exit_2_and_nothing_is_sent(tmp_path, make_smtp_server):
    project, a, b = two_relays(tmp_path, make_smtp_server)
    project.write_contacts(addresses(2))
    for extra in ((), ("--dry-run",)):
        outcome = project.send("--yes", "--stream", "newsletter", *extra)
        assert outcome.exit_code == 2, outcome
        assert "--stream 'newsletter': no such stream" in outcome.stderr
        assert "the streams defined are: marketing, other" in outcome.stderr
        assert "Traceback" not in outcome.stderr
    assert a.messages == [] and b.messages == [] and a.connections == 0 and b.connections == 0
    assert not project.log_path.exists() or project.statuses() == {}


def test_a_relay_login_uses_its_own_password_variable(tmp_path, make_smtp_server):
    server = make_smtp_server(host="127.0.0.2", password="Relay-A-pw-1", auth_require_tls=False)
    project = Project(tmp_path, server)
    project.configure(
        relays={
            "a": {
                "host": "127.0.0.2",
                "port": server.port,
                "security": "none",
                "username": TEST_USERNAME,
                "password_env": "RELAY_A_PASSWORD",
            }
        },
        streams={"transactional": {"relays": ["a"]}},
    )
    project.write_contacts(addresses(2))
    missing = project.send("--yes")
    assert missing.exit_code == 2, missing
    assert "RELAY_A_PASSWORD (named by [relays.a] password_env) is not set" in missing.stderr
    assert server.messages == []
    outcome = project.send("--yes", env={"RELAY_A_PASSWORD": "Relay-A-pw-1"})
    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(server)) == addresses(2)
    assert server.auth_attempts == [(TEST_USERNAME, True)] * server.connections
    assert "Relay-A-pw-1" not in outcome.stderr + outcome.stdout


def test_the_prompt_names_the_stream_and_its_relays(tmp_path, make_smtp_server, monkeypatch):
    import importlib

    cli = importlib.import_module("mailer.cli.app")  # the package's `app` attribute is the Typer app

    project, a, b = two_relays(tmp_path, make_smtp_server)
    project.configure(message={"kind": "marketing", "list_unsubscribe_mailto": "u@acme.example"})
    project.write_contacts(addresses(4))
    asked: list[str] = []
    monkeypatch.setattr(cli, "_confirmation", lambda reporter: lambda question: asked.append(question) or False)
    outcome = project.send()
    assert outcome.exit_code == 2 and "not confirmed" in outcome.stderr
    assert asked and "to 4 recipients through stream 'marketing' (relay a)" in asked[0]
    assert a.messages == []


def test_a_stream_send_with_one_relay_down_mails_everyone_once_with_one_attempt(tmp_path, make_smtp_server):
    import socket

    a = make_smtp_server(host="127.0.0.2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.3", 0))
        dead_port = probe.getsockname()[1]
    project = Project(tmp_path, a)
    project.configure(
        send={"retry_backoff": 30},  # the dead relay is not probed again during the test
        relays={
            "a": {"host": "127.0.0.2", "port": a.port, "security": "none", "timeout": 5},
            "dead": {"host": "127.0.0.3", "port": dead_port, "security": "none", "timeout": 5, "weight": 5},
        },
        streams={"transactional": {"relays": ["dead", "a"]}},
    )
    project.write_contacts(addresses(30))
    outcome = project.send("--yes", "--json")
    assert outcome.exit_code == 0, outcome
    summary = json.loads(outcome.stdout)
    assert summary["counts"]["sent"] == 30 and not summary["counts"].get("deferred")
    assert summary["sent_by_relay"] == {"dead": 0, "a": 30}
    assert f"relay dead could not be reached (cannot connect to 127.0.0.3:{dead_port}: connection refused)" in (
        outcome.stderr
    )
    assert sorted(received_addresses(a)) == addresses(30)
    for address in addresses(30):
        row = project.delivery(address)
        assert (row.status, row.attempts) == ("sent", 1), row


def test_a_streams_source_addresses_and_helo_reach_the_server(tmp_path, make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    project = Project(tmp_path, server)
    project.configure(
        send={"connections": 2, "max_per_connection": 3},
        relays={"a": {"host": "127.0.0.2", "port": server.port, "security": "none", "timeout": 5}},
        streams={
            "transactional": {
                "relays": ["a"],
                "source_addresses": ["127.0.0.9", "127.0.0.10"],
                "helo": "mta1.acme.example",
            }
        },
    )
    project.write_contacts(addresses(12))
    outcome = project.send("--yes")
    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(server)) == addresses(12)
    assert {peer for peer, _ in server.greetings} == {"127.0.0.9", "127.0.0.10"}
    assert {name for _, name in server.greetings} == {"mta1.acme.example"}
    assert {message.peer for message in server.messages} == {"127.0.0.9", "127.0.0.10"}


def test_an_unverified_relay_is_warned_about_by_its_own_name(tmp_path, make_smtp_server):
    server = make_smtp_server(starttls=True)
    project = Project(tmp_path, server)
    project.configure(
        relays={"lab": {"host": "127.0.0.1", "port": server.port, "security": "starttls", "tls_verify": False}},
        streams={"transactional": {"relays": ["lab"]}},
    )
    project.write_contacts(addresses(1))
    outcome = project.send("--yes")
    assert outcome.exit_code == 0, outcome
    assert "[relays.lab] tls_verify = false" in outcome.stderr and "[smtp] tls_verify" not in outcome.stderr


def test_a_kill_9_mid_run_over_two_relays_sends_nobody_twice(tmp_path, make_smtp_server):
    import signal
    import time
    from collections import Counter

    from send_support import wait_for
    from test_send_crash import STALL, finish, slow_down, speed_up

    a = make_smtp_server(host="127.0.0.2")
    b = make_smtp_server(host="127.0.0.3")
    project = Project(tmp_path, a)
    project.configure(
        relays={
            "a": {"host": "127.0.0.2", "port": a.port, "security": "none", "timeout": 5},
            "b": {"host": "127.0.0.3", "port": b.port, "security": "none", "timeout": 5},
        },
        streams={"transactional": {"relays": ["a", "b"]}},
    )
    emails = addresses(16)
    project.write_contacts(emails)
    for server in (a, b):
        slow_down(server)
    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: list(project.peek_statuses().values()).count("sent") >= 2, timeout=30)
    finally:
        process.kill()
        finish(process)
    assert process.returncode == -signal.SIGKILL
    project.report("--campaign", "news")  # applies the killed run's journal
    after_kill = project.peek_statuses()
    assert len([s for s in after_kill.values() if s == "sent"]) < len(emails), "the run was not killed midway"
    unknown = {address for address, status in after_kill.items() if status == "sending"}
    time.sleep(STALL * 3)  # a transaction cut off by the kill may still complete at a server
    for server in (a, b):
        speed_up(server)
    rerun = project.send("--yes", "--json")
    assert rerun.exit_code == (1 if unknown else 0), rerun
    both = Counter(received_addresses(a)) + Counter(received_addresses(b))
    assert max(both.values()) == 1, both  # nobody twice, across both relays and both runs
    assert set(emails) - unknown <= set(both)
    assert received_addresses(a) and received_addresses(b)


def test_a_stream_naming_an_unknown_relay_is_exit_2_before_anything_is_sent(tmp_path, make_smtp_server):
    server = make_smtp_server(host="127.0.0.2")
    project = Project(tmp_path, server)
    project.configure(
        relays={"a": {"host": "127.0.0.2", "port": server.port, "security": "none"}},
        streams={"transactional": {"relays": ["a", "sess"]}},
    )
    project.write_contacts(addresses(3))
    outcome = project.send("--yes")
    assert outcome.exit_code == 2, outcome
    assert "streams.transactional.relays" in outcome.stderr and "'sess', which is not defined" in outcome.stderr
    assert "relays defined: a" in outcome.stderr and "Traceback" not in outcome.stderr
    assert server.connections == 0 and not project.log_path.exists()
