"""`mailer send` through a `direct = true` stream: the real CLI, the loopback DNS responder
serving MX records, and aiosmtpd servers on 127.0.0.2, 127.0.0.3, ... on one port (the
`[direct] port`), as the recipients' mail exchangers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from send_support import Project, received_addresses, wait_for

DATA_STALL = 0.4


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


def direct_project(tmp_path: Path, dns_server, port: int, *, direct: dict | None = None, **sections) -> Project:
    """A project whose `transactional` stream (the default kind) delivers directly."""
    streams = {"transactional": {"direct": True, **sections.pop("stream", {})}}
    return Project(
        tmp_path,
        None,
        streams=streams,
        direct={"port": port, "tls": "opportunistic", **(direct or {})},
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 2.0},
        **sections,
    )


def mx_zone(domains: dict[str, str]) -> dict:
    """domain -> the address of its one MX host (mx.DOMAIN)."""
    zone: dict = {}
    for domain, address in domains.items():
        zone[(domain, "MX")] = [f"10 mx.{domain}."]
        zone[(f"mx.{domain}", "A")] = [address]
    return zone


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def test_a_direct_send_delivers_each_recipient_once_to_its_mx(tmp_path, dns_server, servers) -> None:
    alpha = servers("127.0.0.2")
    beta = servers("127.0.0.3")
    gamma = servers("127.0.0.4")
    zone = mx_zone({"alpha.example.com": "127.0.0.2", "beta.example.com": "127.0.0.3"})
    # gamma.example.com: two MX hosts, the preferred one without a server (refused: the next is tried).
    zone[("gamma.example.com", "MX")] = ["5 dead.gamma.example.com.", "10 mx.gamma.example.com."]
    zone[("dead.gamma.example.com", "A")] = ["127.0.0.5"]
    zone[("mx.gamma.example.com", "A")] = ["127.0.0.4"]
    zone[("delta.example.com", "A")] = ["127.0.0.3"]  # no MX: its own address
    dns_server.set_zone(zone)
    project = direct_project(tmp_path, dns_server, servers.port())
    emails = {
        "alpha.example.com": [f"a{i}@alpha.example.com" for i in range(6)],
        "beta.example.com": [f"b{i}@beta.example.com" for i in range(4)],
        "gamma.example.com": [f"g{i}@gamma.example.com" for i in range(3)],
        "delta.example.com": ["d0@delta.example.com"],
    }
    project.write_contacts([e for group in emails.values() for e in group])

    outcome = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")

    assert outcome.exit_code == 0, outcome
    summary = json.loads(outcome.stdout)
    assert summary["counts"]["sent"] == 14 and summary["counts"]["failed"] == 0
    assert sorted(received_addresses(alpha)) == sorted(emails["alpha.example.com"])
    assert sorted(received_addresses(beta)) == sorted(emails["beta.example.com"] + emails["delta.example.com"])
    assert sorted(received_addresses(gamma)) == sorted(emails["gamma.example.com"])
    assert all(len(m.rcpt_tos) == 1 for s in (alpha, beta, gamma) for m in s.messages)
    assert set(project.statuses().values()) == {"sent"}
    assert project.report("--campaign", "news")["by_status"]["sent"] == 14
    # The content is the rendered template, as through a relay.
    (first,) = alpha.received_by("a0@alpha.example.com")
    assert b"Hello a0," in first.data and b"Subject: News for a0" in first.data


def test_sigkill_mid_run_then_a_rerun_sends_nothing_twice(tmp_path, dns_server, servers) -> None:
    alpha = servers("127.0.0.2")
    beta = servers("127.0.0.3")
    for server in (alpha, beta):
        server.set_fault("*", "data", "250 2.0.0 OK, slowly", stall=DATA_STALL)
    dns_server.set_zone(mx_zone({"alpha.example.com": "127.0.0.2", "beta.example.com": "127.0.0.3"}))
    project = direct_project(tmp_path, dns_server, servers.port(), direct={"connections_per_domain": 1})
    emails = [f"a{i:02d}@alpha.example.com" for i in range(10)] + [f"b{i:02d}@beta.example.com" for i in range(10)]
    project.write_contacts(emails)

    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=30)
    finally:
        process.kill()
        finish(process)
    assert process.returncode == -signal.SIGKILL

    assert list(tmp_path.glob("*.journal")), "a killed run leaves its journal"
    project.report("--campaign", "news")  # applies the journal
    after_kill = project.peek_statuses()
    assert set(after_kill.values()) <= {"sent", "sending"}
    assert len(after_kill) < len(emails), "the run was not killed midway"
    unknown = sorted(a for a, s in after_kill.items() if s == "sending")
    sent = {a for a, s in after_kill.items() if s == "sent"}
    assert unknown, "a transaction was in flight at the kill"
    time.sleep(DATA_STALL * 3)  # a transaction cut off may still end at the server
    by_killed_run = Counter(received_addresses(alpha) + received_addresses(beta))
    assert sent <= set(by_killed_run) <= sent | set(unknown)
    assert max(by_killed_run.values()) == 1

    for server in (alpha, beta):
        with server.lock:  # no delay any more
            server.faults.clear()
    rerun = project.send("--yes", "--json")

    assert rerun.exit_code == 1, rerun  # unknown outcomes: waiting will not settle them
    counts = json.loads(rerun.stdout)["counts"]
    assert counts["unknown"] == len(unknown) and counts["already_done"] == len(sent)
    by_rerun = Counter(received_addresses(alpha) + received_addresses(beta)) - by_killed_run
    assert sorted(by_rerun.elements()) == sorted(set(emails) - sent - set(unknown))
    total = Counter(received_addresses(alpha) + received_addresses(beta))
    assert max(total.values()) == 1  # nobody twice
    report = project.report("--campaign", "news")
    assert sorted(row["recipient"] for row in report["unknown_outcome"]) == unknown
    assert {a for a, s in project.statuses().items() if s == "sending"} == set(unknown)


def test_a_stream_name_that_does_not_exist_is_exit_2_and_nothing_is_sent(tmp_path, dns_server, servers) -> None:
    alpha = servers("127.0.0.2")
    dns_server.set_zone(mx_zone({"alpha.example.com": "127.0.0.2"}))
    project = direct_project(tmp_path, dns_server, servers.port())
    project.write_contacts(["a0@alpha.example.com"])
    outcome = project.run(
        "send", str(project.contacts_path), str(project.template_path), "--yes", "--stream", "transactionl"
    )
    assert outcome.exit_code == 2, outcome
    assert "no such stream" in outcome.stderr and "transactional" in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert received_addresses(alpha) == [] and alpha.connections == 0


def test_ctrl_c_finishes_the_transactions_in_flight_and_exits_130(tmp_path, dns_server, servers) -> None:
    alpha = servers("127.0.0.2")
    beta = servers("127.0.0.3")
    for server in (alpha, beta):
        server.set_fault("*", "data", "250 2.0.0 OK, slowly", stall=DATA_STALL)
    dns_server.set_zone(mx_zone({"alpha.example.com": "127.0.0.2", "beta.example.com": "127.0.0.3"}))
    project = direct_project(tmp_path, dns_server, servers.port(), direct={"connections_per_domain": 2})
    emails = [f"a{i:03d}@alpha.example.com" for i in range(150)] + [f"b{i:03d}@beta.example.com" for i in range(150)]
    project.write_contacts(emails)

    process = project.spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=30)
        process.send_signal(signal.SIGINT)
        stdout, stderr = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "stopping: finishing the messages in flight" in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    statuses = project.statuses()
    assert "sending" not in statuses.values()  # what was in flight was finished and logged
    received = Counter(received_addresses(alpha) + received_addresses(beta))
    assert max(received.values()) == 1
    assert {a for a, s in statuses.items() if s == "sent"} == set(received)
    assert 0 < len(received) < len(emails), "the signal did not stop the run"
    counts = summary["counts"]
    assert counts["sent"] == len(received)
    accounted = counts["sent"] + counts.get("deferred", 0) + counts.get("not_attempted", 0)
    assert accounted == counts["rows"] == len(emails), counts

    for server in (alpha, beta):
        with server.lock:
            server.faults.clear()
    rerun = project.send("--yes")
    assert rerun.exit_code == 0, rerun
    assert sorted(received_addresses(alpha) + received_addresses(beta)) == sorted(emails)


def test_a_reply_rule_of_the_config_suspends_its_destination_in_a_real_send(tmp_path, dns_server, servers) -> None:
    slow = servers("127.0.0.2")
    calm = servers("127.0.0.3")
    slow.set_fault("*", "mail", "451 4.3.2 please slow down, sender")  # no built-in rule knows this text
    dns_server.set_zone(mx_zone({"slow.example.com": "127.0.0.2", "calm.example.com": "127.0.0.3"}))
    project = direct_project(
        tmp_path,
        dns_server,
        servers.port(),
        direct={
            "connections_per_domain": 1,
            "rules": [{"match": "please slow down", "action": "suspend", "duration": "2h"}],
        },
        send={"retries": 2, "retry_backoff": 0.1},
    )
    project.write_contacts([f"s{i}@slow.example.com" for i in range(4)] + [f"c{i}@calm.example.com" for i in range(3)])

    outcome = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")

    assert outcome.exit_code == 75, outcome  # deferred ones remain
    counts = json.loads(outcome.stdout)["counts"]
    assert (counts["sent"], counts["deferred"]) == (3, 4), counts
    # The first reply suspended slow.example.com for two hours (longer than the run waits):
    # its other messages were deferred without a MAIL; without the rule each would have
    # been tried three times (retries = 2).
    assert len(slow.mail_times) == 1
    assert sorted(received_addresses(calm)) == [f"c{i}@calm.example.com" for i in range(3)]
    statuses = project.statuses()
    assert {statuses[f"s{i}@slow.example.com"] for i in range(4)} == {"deferred"}
