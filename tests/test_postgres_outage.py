"""The PostgreSQL send log going away, end to end: real `mailer send` processes, a real
PostgreSQL 15 cluster of this module's own (stopped with `pg_ctl stop -m immediate`,
or its backends killed, mid-run) and a loopback aiosmtpd server that counts what
arrived. Also the start-up errors (exit 2, nothing sent) and --debug never showing
the password."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import psycopg
import pytest
from send_support import Project, addresses, received_addresses, wait_for
from test_send_crash import finish, slow_down, speed_up

LEASE = "2s"


@pytest.fixture
def own_url(own_pg_cluster, monkeypatch) -> str:
    database = "o_" + uuid.uuid4().hex[:12]
    own_pg_cluster.admin(f"CREATE DATABASE {database}")
    monkeypatch.setenv("PGPASSWORD", own_pg_cluster.password)
    return own_pg_cluster.url(database)


def _statuses(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT recipient, status FROM deliveries WHERE campaign = 'news'").fetchall())


def _assert_rerun_sends_the_rest_once(project: Project, server, emails: list[str], url: str) -> None:
    """The re-run mails everyone not yet mailed, nobody twice; only reported unknowns may be in doubt."""
    speed_up(server)
    again = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")
    assert again.exit_code in (0, 1), again  # 1 only for unknown outcomes found (as after a kill)
    got = Counter(received_addresses(server))
    assert all(count == 1 for count in got.values()), [a for a, n in got.items() if n > 1]
    statuses = _statuses(url)
    unknown = {address for address, status in statuses.items() if status == "sending"}
    assert set(got) | unknown == set(emails)
    assert all(statuses[address] == "sent" for address in got if address not in unknown)
    report = project.report("--campaign", "news")
    assert {row["recipient"] for row in report["unknown_outcome"]} == unknown
    assert (again.exit_code == 1) == bool(unknown), again
    # Unknowns are not resent without --resend-unknown: a third run mails nobody.
    third = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")
    assert third.exit_code in (0, 1), third
    assert Counter(received_addresses(server)) == got


def test_cluster_stopped_mid_run_is_exit_75_and_the_rerun_sends_the_rest_once(
    smtp_server, tmp_path, own_pg_cluster, own_url
):
    project = Project(tmp_path, smtp_server, log={"url": own_url, "lease": LEASE})
    emails = addresses(80)
    project.write_contacts(emails)
    slow_down(smtp_server, 0.05)
    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: len(received_addresses(smtp_server)) >= 10, timeout=60)
        own_pg_cluster.stop("immediate")
        stdout, stderr = finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            finish(process)
        own_pg_cluster.start()
    assert process.returncode == 75, stderr
    port = own_pg_cluster.port
    database = own_url.rsplit("/", 1)[1]
    assert f"error: lost the connection to PostgreSQL at 127.0.0.1:{port}, database '{database}'" in stderr, stderr
    assert "What was sent is in the local delivery journal" in stderr
    assert "kept in the local delivery journal, and a re-run (once the database is back) applies them" in stderr
    assert "every outcome is in the send log" not in stderr  # it is not: the server went away
    assert own_pg_cluster.password not in stdout + stderr
    stopped_at = len(received_addresses(smtp_server))
    assert stopped_at < len(emails), "the run went on handing out work without its database"
    assert Counter(received_addresses(smtp_server)).most_common(1)[0][1] == 1
    _assert_rerun_sends_the_rest_once(project, smtp_server, emails, own_url)


def test_backends_killed_mid_run_is_exit_75_and_the_rerun_sends_the_rest_once(
    smtp_server, tmp_path, own_pg_cluster, own_url
):
    project = Project(tmp_path, smtp_server, log={"url": own_url, "lease": LEASE})
    emails = addresses(80)
    project.write_contacts(emails)
    slow_down(smtp_server, 0.05)
    database = own_url.rsplit("/", 1)[1]
    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: len(received_addresses(smtp_server)) >= 10, timeout=60)
        own_pg_cluster.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
        stdout, stderr = finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            finish(process)
    assert process.returncode == 75, stderr
    assert (
        f"error: lost the connection to PostgreSQL at 127.0.0.1:{own_pg_cluster.port}, database '{database}'" in stderr
    )
    assert own_pg_cluster.password not in stdout + stderr
    assert len(received_addresses(smtp_server)) < len(emails)
    _assert_rerun_sends_the_rest_once(project, smtp_server, emails, own_url)


# --- at start: exit 2, nothing sent, never the password ------------------------------

SECRET = "Distinctive-Pg-Secret-91xQ"


@pytest.mark.parametrize("problem", ["bad password", "missing database", "no server"])
def test_database_problem_at_start_is_exit_2_before_anything_is_sent(smtp_server, tmp_path, pg_cluster, problem):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    host_port, database, password = {
        "bad password": (f"127.0.0.1:{pg_cluster.port}", "postgres", SECRET),
        "missing database": (f"127.0.0.1:{pg_cluster.port}", "no_such_db_q", pg_cluster.password),
        "no server": (f"127.0.0.1:{closed}", "news", SECRET),
    }[problem]
    project = Project(
        tmp_path,
        smtp_server,
        log={"url": f"postgresql://{pg_cluster.user}@{host_port}/{database}", "password_env": "MAILER_DB_PW"},
    )
    project.write_contacts(addresses(5))
    outcome = project.run(
        "send", str(project.contacts_path), str(project.template_path), "--yes", "--debug",
        env={"MAILER_DB_PW": password, "PGPASSWORD": SECRET},
    )  # fmt: skip
    assert outcome.exit_code == 2, outcome
    assert f"PostgreSQL at {host_port}, database '{database}'" in outcome.stderr, outcome
    assert SECRET not in outcome.stdout + outcome.stderr
    assert pg_cluster.password not in outcome.stdout + outcome.stderr
    assert received_addresses(smtp_server) == [] and smtp_server.rcpt_attempts == []


def test_debug_output_of_a_real_send_never_shows_the_password(smtp_server, tmp_path, pg_cluster):
    # A role of its own whose password is the distinctive string.
    name = "d_" + uuid.uuid4().hex[:12]
    pg_cluster.admin(f"CREATE ROLE {name} LOGIN PASSWORD '{SECRET}'")
    pg_cluster.admin(f"CREATE DATABASE {name} OWNER {name}")
    url = f"postgresql://{name}@127.0.0.1:{pg_cluster.port}/{name}"
    for env, log in (
        ({"PGPASSWORD": SECRET}, {}),
        ({"MAILER_DB_PW": SECRET, "PGPASSWORD": "other"}, {"password_env": "MAILER_DB_PW"}),
    ):
        project = Project(tmp_path, smtp_server, log={"url": url, **log})
        emails = addresses(3, prefix=f"u{len(received_addresses(smtp_server))}x")
        project.write_contacts(emails)
        outcome = project.run(
            "send", str(project.contacts_path), str(project.template_path), "--yes", "--debug", "--json", env=env
        )
        assert outcome.exit_code == 0, outcome
        assert json.loads(outcome.stdout)["counts"]["sent"] == 3
        assert "MAIL FROM" in outcome.stderr, outcome  # --debug did show the trace
        assert SECRET not in outcome.stdout + outcome.stderr
        assert SECRET.encode() not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    # A password in the URL is refused, and not echoed, with --debug too.
    project.configure(log={"url": f"postgresql://{name}:{SECRET}@127.0.0.1:{pg_cluster.port}/{name}"})
    outcome = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--debug")
    assert outcome.exit_code == 2 and "log.url" in outcome.stderr, outcome
    assert SECRET not in outcome.stdout + outcome.stderr
