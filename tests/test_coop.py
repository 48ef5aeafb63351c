"""Cooperating runs on PostgreSQL: several real `mailer send` processes share one campaign.

Every test runs real processes against the session's PostgreSQL cluster
(tests/pg_fixtures.py) and one loopback aiosmtpd server; a second folder with its own
[log] path (journals, lock files) plays another host with the same contact file.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from send_support import Project, addresses, received_addresses, wait_for
from test_send_crash import finish, slow_down

from mailer.core.config import LogConfig
from mailer.core.outcomes import Status
from mailer.send.journal import JournalWriter
from mailer.store import open_store
from mailer.store.pg_work import (
    CampaignWork,
    LostClaimError,
    chunk_lines_for,
    contacts_fingerprint,
    record_held_events,
)

LEASE = "2s"


def hosts(tmp_path: Path, server, url: str, count: int, **sections) -> list[Project]:
    """``count`` project folders on one database: the same contacts and template, each its own [log] path."""
    projects = []
    for index in range(count):
        root = tmp_path / f"host{index}"
        root.mkdir()
        projects.append(Project(root, server, log={"url": url, "lease": LEASE}, **sections))
    return projects


def same_contacts(projects: list[Project], emails: list[str]) -> None:
    first = projects[0].write_contacts(emails)
    for other in projects[1:]:
        shutil.copy(first, other.contacts_path)


def summaries(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, dict, str]]:
    done = []
    for process in processes:
        stdout, stderr = finish(process, timeout=timeout)
        done.append((process.returncode, json.loads(stdout) if stdout.strip() else {}, stderr))
    return done


def statuses(url: str, campaign: str = "news") -> dict[str, str]:
    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute("SELECT recipient, status FROM deliveries WHERE campaign = %s", (campaign,)).fetchall()
        except psycopg.errors.UndefinedTable:  # the first run has not created the schema yet
            return {}
    return dict(rows)


def test_three_runs_at_once_mail_each_address_exactly_once_and_share_the_work(smtp_server, tmp_path, pg_url):
    slow_down(smtp_server, 0.03)  # every run gets to claim before the list is gone
    projects = hosts(tmp_path, smtp_server, pg_url, 3)
    emails = addresses(240)
    same_contacts(projects, emails)
    processes = [project.spawn_send("--yes", "--json") for project in projects]
    results = summaries(processes)
    for code, summary, stderr in results:
        assert code == 0, stderr
        assert summary["counts"].get("unknown", 0) == 0
    got = received_addresses(smtp_server)
    assert Counter(got) == Counter(emails), "every address exactly once"
    sent = [summary["counts"].get("sent", 0) for _, summary, _ in results]
    assert sum(sent) == len(emails), sent  # each run counts only its own messages
    assert sum(1 for count in sent if count) > 1, f"only one run did any work: {sent}"
    # Each run's rows are its own: together they are the list, once.
    assert sum(summary["counts"].get("rows", 0) for _, summary, _ in results) == len(emails)
    report = projects[0].report("--campaign", "news")
    assert report["by_status"]["sent"] == len(emails)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM work_chunks WHERE NOT done").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM work_runs").fetchone() == (0,)
    # A later run resumes: nobody is mailed again (a new pass settles everything).
    again = projects[1].run("send", str(projects[1].contacts_path), str(projects[1].template_path), "--yes", "--json")
    assert again.exit_code == 0, again
    assert json.loads(again.stdout)["counts"]["already_done"] == len(emails)
    assert len(received_addresses(smtp_server)) == len(emails)


def test_the_campaign_rate_holds_for_all_runs_together_at_the_server(smtp_server, tmp_path, pg_url):
    projects = hosts(tmp_path, smtp_server, pg_url, 3, send={"rate": "20/s", "connections": 2})
    emails = addresses(100)
    same_contacts(projects, emails)
    processes = [project.spawn_send("--yes", "--json") for project in projects]
    results = summaries(processes)
    for code, _summary, stderr in results:
        assert code == 0, stderr
    with smtp_server.lock:
        starts = sorted(message.started for message in smtp_server.messages)
    assert len(starts) == len(emails)
    assert sum(1 for _, summary, _ in results if summary["counts"].get("sent")) > 1, results
    # Three runs at 20/s each would be 60/s: together they keep about 20 (generous
    # tolerances: a loaded machine delays slots, it never adds any).
    overall = (len(starts) - 1) / (starts[-1] - starts[0])
    assert overall < 20 * 1.3, f"{overall:.1f} msg/s"
    busiest = max(sum(1 for t in starts if begin <= t < begin + 1.0) for begin in starts)
    assert busiest <= 20 + 6, f"{busiest} transactions started within one second"


def test_a_run_killed_mid_way_leaves_its_unstarted_recipients_to_the_others(smtp_server, tmp_path, pg_url):
    slow_down(smtp_server, 0.05)
    projects = hosts(tmp_path, smtp_server, pg_url, 3)
    emails = addresses(300)
    same_contacts(projects, emails)
    victim = projects[0].spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in statuses(pg_url).values(), timeout=60)
        others = [project.spawn_send("--yes", "--json") for project in projects[1:]]
        wait_for(lambda: len(received_addresses(smtp_server)) >= 40, timeout=60)
    finally:
        victim.send_signal(signal.SIGKILL)
        finish(victim)
    assert victim.returncode == -signal.SIGKILL
    with psycopg.connect(pg_url) as conn:
        (victim_run,) = conn.execute("SELECT min(id) FROM runs").fetchone()
        held = conn.execute("SELECT count(*) FROM work_chunks WHERE run_id = %s", (victim_run,)).fetchone()[0]
    assert held, "the killed run held part of the list"
    results = summaries(others)
    for code, summary, stderr in results:
        # A run that took over the killed run's chunk met its unknown outcomes: exit 1, as
        # a single run resuming after a kill does.
        assert code == (1 if summary["counts"].get("unknown") else 0), stderr
        assert not summary["counts"].get("failed")
    assert sum(summary["counts"].get("unknown", 0) for _, summary, _ in results) <= 4
    final = statuses(pg_url)
    unknown = {address for address, status in final.items() if status == "sending"}
    assert len(unknown) <= 2 * 2, unknown  # at most its connections' transactions in flight
    assert all(final[address] == "sent" for address in emails if address not in unknown)
    got = Counter(received_addresses(smtp_server))
    assert all(count == 1 for count in got.values()), [a for a, c in got.items() if c > 1]
    assert set(emails) - set(got) <= unknown, "only the unknown outcomes may be missing"
    # The killed run's journal is on its own host: a report there applies its outcomes.
    assert list(projects[0].root.glob("*.run*.journal")), "a killed run leaves its journal"
    projects[0].report("--campaign", "news")
    assert not list(projects[0].root.glob("*.run*.journal"))
    final = statuses(pg_url)
    unknown = {address for address, status in final.items() if status == "sending"}
    report = projects[1].report("--campaign", "news")
    assert sorted(row["recipient"] for row in report["unknown_outcome"]) == sorted(unknown)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM work_chunks WHERE NOT done").fetchone() == (0,)
    # The unknown outcomes are resent only on request.
    again = projects[2].run(
        "send", str(projects[2].contacts_path), str(projects[2].template_path), "--yes", "--json", "--resend-unknown"
    )
    assert again.exit_code == 0, again
    assert set(received_addresses(smtp_server)) == set(emails)


def test_suppression_is_shared_by_runs_on_every_host(smtp_server, tmp_path, pg_url):
    projects = hosts(tmp_path, smtp_server, pg_url, 2)
    emails = addresses(40)
    same_contacts(projects, emails)
    assert projects[1].cli("suppress", "add", emails[7].upper()).exit_code == 0
    processes = [project.spawn_send("--yes", "--json") for project in projects]
    results = summaries(processes)
    for code, _summary, stderr in results:
        assert code == 0, stderr
    assert sorted(received_addresses(smtp_server)) == sorted(e for e in emails if e != emails[7])
    # Counted by the run whose chunk held it (and again by a run that started after the
    # first had finished the whole list: that run's new pass settles every row).
    assert sum(summary["counts"].get("suppressed", 0) for _, summary, _ in results) >= 1
    assert statuses(pg_url)[emails[7]] == "suppressed"
    assert projects[0].report("--campaign", "news")["by_status"]["suppressed"] == 1


def test_another_contact_file_for_a_campaign_being_sent_is_an_error_that_says_so(smtp_server, tmp_path, pg_url):
    (project,) = hosts(tmp_path, smtp_server, pg_url, 1)
    other = project.write_contacts(addresses(10, prefix="other"), name="other.csv")
    project.write_contacts(addresses(10))
    fingerprint, lines = contacts_fingerprint(project.contacts_path)
    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        run = store.start_run("news", template=None, contacts=None)
        work = CampaignWork.join(store, "news", run, fingerprint=fingerprint, lines=lines, contacts="contacts.csv",
                                 lease=30)  # fmt: skip
        work.abandon()  # a live run of the first file, as far as the database knows
        outcome = project.send("--yes", contacts=other)
        assert outcome.exit_code == 2, outcome
        assert "different contact file" in outcome.stderr and "contacts.csv" in outcome.stderr
        assert received_addresses(smtp_server) == []
        work.finish(complete=False)
    # Given back but not done: the pass is unfinished, the same file is still required.
    assert project.send("--yes", contacts=other).exit_code == 2
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE work_chunks SET done = true")
    outcome = project.send("--yes", contacts=other)  # the last pass is over: a new list may start
    assert outcome.exit_code == 0, outcome
    assert len(received_addresses(smtp_server)) == 10


def test_contacts_from_standard_input_work_in_a_cooperating_run(smtp_server, tmp_path, pg_url):
    # A cooperating run reads its list twice (fingerprint, then send): standard input is spooled first.
    (project,) = hosts(tmp_path, smtp_server, pg_url, 1)
    emails = addresses(3)
    project.write_contacts(emails)
    text = project.contacts_path.read_text(encoding="utf-8")
    outcome = project.cli("send", "-", str(project.template_path), "--yes", input=text)
    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(smtp_server)) == sorted(emails)


def test_a_bad_lease_is_a_config_error_naming_the_key(tmp_path, pg_url):
    project = Project(tmp_path, None, log={"url": pg_url, "lease": "soon"})
    outcome = project.cli("suppress", "list")
    assert outcome.exit_code == 2 and "log.lease" in outcome.stderr, outcome


def test_chunks_are_small_for_short_lists_and_bounded_for_long_ones(tmp_path):
    assert chunk_lines_for(60) == 5 and chunk_lines_for(1_000_001) == 200
    path = tmp_path / "c.csv"
    path.write_bytes(b"email\na@x.org\nb@x.org")  # no final newline: still three lines
    assert contacts_fingerprint(path)[1] == 3


def test_sqlite_keeps_one_run_per_campaign(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(6))
    slow_down(smtp_server, 0.4)
    first = project.spawn_send("--yes")
    try:
        wait_for(lambda: project.peek_statuses(), timeout=20)
        second = project.send("--yes")
        assert second.exit_code == 75, second
        assert "being sent" in second.stderr or "lock" in second.stderr.lower()
    finally:
        first.kill()
        finish(first)


def test_a_run_whose_chunk_was_taken_over_is_refused_its_sending(pg_url, tmp_path):
    contacts = tmp_path / "c.csv"
    contacts.write_text("email\n" + "".join(f"{a}\n" for a in addresses(20)), encoding="utf-8")
    fingerprint, lines = contacts_fingerprint(contacts)
    first = addresses(1)[0]
    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        runs = [store.start_run("news", template=None, contacts=None) for _ in range(2)]
        stalled = CampaignWork.join(store, "news", runs[0], fingerprint=fingerprint, lines=lines, contacts=None,
                                    lease=4)  # fmt: skip
        stalled.abandon()  # no more heartbeats: as if the run hung
        assert stalled.claim(position=0) == [0]
        other = CampaignWork.join(store, "news", runs[1], fingerprint=fingerprint, lines=lines, contacts=None,
                                  lease=30)  # fmt: skip
        try:
            assert other.claim(position=0) == [1], "a live lease is never taken"
            wait_for(lambda: other.claim(position=0) == [0], timeout=30, interval=0.2)
            event = (first, "sending", None, None, "<1@x>", 2)
            refused = record_held_events(store, "news", [event], run_id=runs[0], chunk_lines=stalled.chunk_lines,
                                         journal=(runs[0], 100))  # fmt: skip
            assert refused == {first}
            assert store.statuses("news", [first]) == [None]
            assert store.journal_applied(runs[0]) == 100  # the batch still moves its journal on
            kept = record_held_events(store, "news", [event], run_id=runs[1], chunk_lines=other.chunk_lines,
                                      journal=(runs[1], 50))  # fmt: skip
            assert kept == set()
            assert store.statuses("news", [first]) == [Status.SENDING]
        finally:
            other.finish(complete=False)


def test_a_durable_sending_waits_for_its_commit_and_raises_when_refused(pg_url, tmp_path):
    refusing = {"lost@x.org"}
    applied: list[list] = []

    def apply(events, offset):
        applied.append(list(events))
        return {event[0] for event in events if event[0] in refusing and event[1] == "sending"}

    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        run = store.start_run("news", template=None, contacts=None)
        path = tmp_path / "run.journal"
        writer = JournalWriter(store, "news", run, path=path, apply=apply, durable_sending=True)
        try:
            writer.append(("kept@x.org", "sending", None, None, "<1@x>", 2))
            assert applied and applied[-1][-1][0] == "kept@x.org", "on record before append() returns"
            with pytest.raises(LostClaimError) as caught:
                writer.append(("lost@x.org", "sending", None, None, "<2@x>", 3))
            assert caught.value.exit_code == 75
            writer.append(("kept@x.org", "sent", 250, "250 ok", "<1@x>", None))  # outcomes still go on
        finally:
            writer.close()
        assert [event[0] for batch in applied for event in batch][-1] == "kept@x.org"
        assert not path.exists()


def test_a_run_with_a_limit_stops_claiming_and_gives_the_rest_back(smtp_server, tmp_path, pg_url):
    (project,) = hosts(tmp_path, smtp_server, pg_url, 1)
    emails = addresses(40)
    project.write_contacts(emails)
    limited = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json",
                          "--limit", "7")  # fmt: skip
    assert limited.exit_code == 0, limited
    assert json.loads(limited.stdout)["counts"]["sent"] == 7
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM work_chunks WHERE run_id IS NOT NULL").fetchone() == (0,)
    rest = project.run("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")
    assert rest.exit_code == 0, rest
    assert Counter(received_addresses(smtp_server)) == Counter(emails)


def test_a_batch_naming_a_recipient_twice_or_with_a_bounce_is_applied_in_order(pg_url, tmp_path):
    contacts = tmp_path / "c.csv"
    contacts.write_text("email\n" + "".join(f"{a}\n" for a in addresses(20)), encoding="utf-8")
    fingerprint, lines = contacts_fingerprint(contacts)
    ann, bob = addresses(2)
    with open_store(LogConfig(path=tmp_path / "x", url=pg_url)) as store:
        run = store.start_run("news", template=None, contacts=None)
        work = CampaignWork.join(store, "news", run, fingerprint=fingerprint, lines=lines, contacts=None, lease=30)
        try:
            assert work.claim(position=0) == [0]
            retried = [(ann, "sending", None, None, "<1@x>", 2), (ann, "deferred", 451, "451 later", "<1@x>", None),
                       (ann, "sending", None, None, "<1@x>", 2)]  # fmt: skip
            assert record_held_events(store, "news", retried, run_id=run, chunk_lines=work.chunk_lines,
                                      journal=(run, 10)) == set()  # fmt: skip
            assert store.statuses("news", [ann]) == [Status.SENDING]
            assert store.report("news").unknown_outcome[0].attempts == 2
            bounced = [(bob, "sending", None, None, "<2@x>", 3), (bob, "failed", 550, "550 5.1.1 no such user",
                                                                  "<2@x>", None)]  # fmt: skip
            record_held_events(store, "news", bounced, run_id=run, chunk_lines=work.chunk_lines, journal=(run, 20))
            assert store.statuses("news", [bob]) == [Status.FAILED]
            assert store.suppressed([bob]) == [True]
            assert store.journal_applied(run) == 20
        finally:
            work.finish(complete=False)
