"""A real `mailer send` process killed, interrupted or overlapped, against a slow loopback server.

The server stalls every MAIL FROM (then accepts it), so a run of a dozen messages
takes a few seconds and there is always a transaction in flight to interrupt.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from send_support import Project, addresses, received_addresses, wait_for

from mailer.core.config import load_config
from mailer.core.outcomes import Outgoing
from mailer.delivery.routes import Relay
from mailer.send.child import DeliveryProcess
from mailer.store.sqlite import SendLog

STALL = 0.4


def slow_down(server, stall: float = STALL) -> None:
    """Every message waits ``stall`` seconds after its content arrived, then is accepted.

    (The fixture's ``stall`` fault answers with a failure or skips the recording, so
    the recording DATA handler is wrapped instead. A client that goes away during the
    wait cancels it: that message is not received.)
    """
    handler = server._controller.handler
    handler.mailer_test_delay = stall
    if "handle_DATA" not in vars(handler):
        accept = type(handler).handle_DATA

        async def slow_data(smtp, session, envelope):
            await asyncio.sleep(handler.mailer_test_delay)
            return await accept(handler, smtp, session, envelope)

        handler.handle_DATA = slow_data


def speed_up(server) -> None:
    server._controller.handler.mailer_test_delay = 0.0


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def test_sigkill_mid_run_leaves_unknown_outcomes_that_are_reported_and_resent_only_on_request(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(12)
    project.write_contacts(emails)
    slow_down(smtp_server)

    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=20)
    finally:
        process.kill()
        finish(process)
    assert process.returncode == -signal.SIGKILL

    # The killed run's last events may still be only in its delivery journal: the next
    # `mailer report` (or `mailer send`) moves them into the send log and removes it.
    assert list(tmp_path.glob("*.journal")), "a killed run leaves its journal"
    project.report("--campaign", "news")
    assert not list(tmp_path.glob("*.journal"))
    after_kill = project.peek_statuses()
    assert "sent" in after_kill.values()
    assert len(after_kill) < len(emails), "the run was not killed midway"
    unknown = sorted(a for a, s in after_kill.items() if s == "sending")
    assert set(after_kill.values()) <= {"sent", "sending"}
    with SendLog.open(project.log_path, create=False) as log:
        (killed_run,) = log.list_runs("news")
    assert killed_run.finished_at is None and killed_run.pid == process.pid

    # A transaction cut off by the kill may still complete at the server a moment later
    # (the client's socket is closed, but the handler's delay may already be running):
    # settle before taking the server's view of the killed run.
    time.sleep(STALL * 3)
    by_killed_run = Counter(received_addresses(smtp_server))
    sent = {a for a, s in after_kill.items() if s == "sent"}
    # The log is written before each transaction: the server got nobody the log did not
    # name as `sent` or `sending`, and everybody the log names as `sent`.
    assert sent <= set(by_killed_run) <= sent | set(unknown)
    assert max(by_killed_run.values()) == 1

    speed_up(smtp_server)
    rerun = project.send("--yes", "--json")

    # The unknown ones are left alone: the run finishes, and says it could not settle them
    # (exit 1: waiting will not settle them, so not 75).
    assert rerun.exit_code == (1 if unknown else 0), rerun
    counts = json.loads(rerun.stdout)["counts"]
    assert counts["unknown"] == len(unknown)
    assert counts["already_done"] == len(sent)
    if unknown:
        assert f"outcome unknown (status sending; see mailer report) {len(unknown)}" in rerun.stderr
    by_rerun = Counter(received_addresses(smtp_server)) - by_killed_run
    # The re-run sent exactly the ones never tried, once each: nothing already sent, nothing unknown.
    assert sorted(by_rerun.elements()) == sorted(set(emails) - sent - set(unknown))
    report = project.report("--campaign", "news")
    assert sorted(row["recipient"] for row in report["unknown_outcome"]) == unknown
    assert all(row["status"] == "sending" for row in report["unknown_outcome"])
    assert report["by_status"]["sending"] == len(unknown)
    if unknown:
        human = project.cli("report", "--campaign", "news")
        assert f"{len(unknown)} recipients have an unknown outcome" in human.stdout
        assert all(address in human.stdout for address in unknown)

    before_resend = Counter(received_addresses(smtp_server))
    resend = project.send("--yes", "--resend-unknown", "--json")

    assert resend.exit_code == 0, resend
    assert json.loads(resend.stdout)["counts"]["sent"] == len(unknown)
    # --resend-unknown sends each unknown one once more (a second copy for those the
    # killed run did deliver: that is the risk the option takes) and nobody else.
    assert sorted((Counter(received_addresses(smtp_server)) - before_resend).elements()) == unknown
    assert set(received_addresses(smtp_server)) == set(emails)
    assert set(project.statuses().values()) == {"sent"}
    assert project.report("--campaign", "news")["unknown_outcome"] == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_signal_finishes_the_messages_in_flight_prints_the_summary_and_exits_130(smtp_server, tmp_path, signum):
    project = Project(tmp_path, smtp_server)
    emails = addresses(16)
    project.write_contacts(emails)
    slow_down(smtp_server)

    process = project.spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=20)
        process.send_signal(signum)
        stdout, stderr = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "stopping: finishing the messages in flight" in stderr
    assert "send of campaign 'news'" in stderr  # the summary line
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["exit_code"] == 130

    statuses = project.statuses()
    assert "sending" not in statuses.values()  # what was in flight was finished and logged
    received = Counter(received_addresses(smtp_server))
    assert max(received.values()) == 1
    assert {a for a, s in statuses.items() if s == "sent"} == set(received)
    assert summary["counts"]["sent"] == len(received)
    assert len(received) < len(emails), "the signal did not stop the run"
    # Every row read is accounted for: sent, or deferred, or never attempted.
    counts = summary["counts"]
    accounted = counts["sent"] + counts.get("deferred", 0) + counts.get("not_attempted", 0)
    assert accounted == counts["rows"] == len(emails), counts
    untouched = set(emails) - set(received)
    assert all(statuses.get(a) in (None, "deferred") for a in untouched)
    with SendLog.open(project.log_path, create=False) as log:
        (run,) = log.list_runs("news")
    assert run.interrupted is True and run.finished_at is not None

    speed_up(smtp_server)
    rerun = project.send("--yes")

    assert rerun.exit_code == 0, rerun
    assert sorted(received_addresses(smtp_server)) == emails
    assert set(project.statuses().values()) == {"sent"}


def test_an_interrupted_long_list_accounts_for_every_row(smtp_server, tmp_path):
    # More contacts than the delivery queue holds (1,000), so that the run stops with
    # messages still in the pipe and in a half-unpacked batch: all must be counted.
    project = Project(tmp_path, smtp_server)
    project.configure(send={"connections": 1})
    emails = addresses(1500)
    project.write_contacts(emails)
    slow_down(smtp_server, stall=0.2)

    process = project.spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=20)
        # The renderer blocked on the full pipe: the queue and the pipe are full (on a
        # loaded machine the first message can go out well before that).
        wait_for(lambda: Path(f"/proc/{process.pid}/wchan").read_text() == "anon_pipe_write", timeout=30)
        process.send_signal(signal.SIGINT)
        stdout, stderr = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    counts = json.loads(stdout)["counts"]
    assert counts["not_attempted"] > 1000, counts
    accounted = counts["sent"] + counts.get("deferred", 0) + counts["not_attempted"]
    assert accounted == counts["rows"], counts
    assert counts["sent"] == len(received_addresses(smtp_server))


def stalled_send(smtp_server, tmp_path, count: int) -> tuple[Project, subprocess.Popen]:
    """A real send of ``count`` contacts over one connection to a server that stalls 5 s a message."""
    project = Project(tmp_path, smtp_server)
    project.configure(send={"connections": 1})
    project.write_contacts(addresses(count))
    slow_down(smtp_server, stall=5.0)
    return project, project.spawn_send("--yes")


def test_a_second_sigint_aborts_at_once(smtp_server, tmp_path):
    project, process = stalled_send(smtp_server, tmp_path, 4)
    try:
        wait_for(lambda: "sending" in project.peek_statuses().values(), timeout=20)
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping" in (process.stderr.readline() or "stopping"), timeout=5)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = finish(process, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert elapsed < 3.0, "the second Ctrl-C waited for the stalled transaction"
    assert "aborted" in stderr
    # The transaction in flight had no outcome: its row says so (once `mailer report`
    # has applied what the aborted run left in its journal).
    project.report("--campaign", "news")
    assert list(project.peek_statuses().values()) == ["sending"]
    assert smtp_server.messages == []


def test_a_second_run_of_the_same_campaign_is_refused_with_75_naming_the_holder(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(10)
    project.write_contacts(emails)
    slow_down(smtp_server)

    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: project.peek_statuses(), timeout=20)  # it holds the lock and is sending

        overlap = project.send("--yes")

        assert overlap.exit_code == 75, overlap
        assert "already being sent by another run" in overlap.stderr
        assert f"pid {process.pid}" in overlap.stderr
        # Another campaign on the same log is not blocked.
        project.write_contacts(["solo@example.org"], name="other.csv")
        other = project.send("--yes", "--campaign", "other", contacts=tmp_path / "other.csv")
        assert other.exit_code == 0, other
    finally:
        speed_up(smtp_server)
        stdout, stderr = finish(process)
    assert process.returncode == 0, stderr
    assert sorted(received_addresses(smtp_server)) == sorted(emails + ["solo@example.org"])
    assert set(project.statuses().values()) == {"sent"}


def test_every_message_is_on_record_as_sending_before_its_transaction_reaches_the_relay(smtp_server, tmp_path):
    """The property a kill relies on, checked at the relay: when the content of a
    message arrives, its ``sending`` line is already in the journal or the send log."""
    project = Project(tmp_path, smtp_server)
    emails = addresses(40)
    project.write_contacts(emails)
    handler = smtp_server._controller.handler
    accept = type(handler).handle_DATA
    on_record_at_data: dict[str, bool] = {}

    def claimed(recipient: str) -> bool:
        for path in tmp_path.glob("*.journal"):
            for raw in path.read_bytes().splitlines()[1:]:
                event = json.loads(raw)
                if event[0] == recipient and event[1] == "sending":
                    return True
        return project.peek_statuses().get(recipient) is not None

    async def checking_data(smtp, session, envelope):
        for recipient in envelope.rcpt_tos:
            on_record_at_data[recipient] = claimed(recipient)
        return await accept(handler, smtp, session, envelope)

    handler.handle_DATA = checking_data
    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert sorted(on_record_at_data) == emails
    assert all(on_record_at_data.values()), [a for a, ok in on_record_at_data.items() if not ok]
    assert not list(tmp_path.glob("*.journal"))  # a run that ends normally removes its journal


def test_a_killed_delivery_process_is_reported_and_its_journal_applied_by_the_same_run(smtp_server, tmp_path):
    project, process = stalled_send(smtp_server, tmp_path, 6)
    try:
        wait_for(
            lambda: list(tmp_path.glob("*.journal")) and b'"sending"' in next(tmp_path.glob("*.journal")).read_bytes(),
            timeout=20,
        )
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        (child,) = [int(pid) for pid in children]
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = finish(process)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
    # Not 2 ("nothing was sent"): a message was in flight. A re-run resumes: 75.
    assert process.returncode == 75, stderr
    assert elapsed < 10, elapsed
    assert f"the delivery process (pid {child}) ended unexpectedly (killed by signal 9)" in stderr
    assert "The run stopped after 0 messages had been sent" in stderr
    assert "outcome unknown (status sending; see mailer report) 1" in stderr
    assert "not attempted (the run stopped first) 5" in stderr
    # The parent applied the dead child's journal before it exited: no later command needed.
    assert not list(tmp_path.glob("*.journal"))
    assert list(project.peek_statuses().values()) == ["sending"]
    assert smtp_server.messages == []
    # The lock is free: the next run sends the five never attempted (and leaves the unknown one).
    speed_up(smtp_server)
    rerun = project.send("--yes")
    assert rerun.exit_code == 1, rerun
    assert len(received_addresses(smtp_server)) == 5


def test_a_failure_while_feeding_ends_the_delivery_process_at_once(smtp_server, tmp_path):
    """The renderer stops on an error: the delivery process must see the end of its
    pipe and finish, not wait for more messages until it is killed."""
    project = Project(tmp_path, smtp_server)
    config = load_config(project.config_path)
    with SendLog.open(config.log.path) as log:
        run_id = log.start_run("news", template=None, contacts=None)
    relays = [Relay(name="smtp", smtp=config.smtp)]
    delivery = DeliveryProcess(config, relays=relays, ssl_context=None, campaign="news", run_id=run_id)

    def messages():
        for n in range(3):
            data = f"From: a@acme.example\r\nTo: u{n}@example.com\r\nSubject: n\r\n\r\nhi\r\n".encode()
            yield Outgoing(
                key=(f"u{n}@example.com", n + 2),
                sender="a@acme.example",
                recipients=[f"u{n}@example.com"],
                data=data,
                message_id=f"<{n}@acme.example>",
            )
        raise RuntimeError("the renderer failed")

    with pytest.raises(RuntimeError):
        delivery.feed(messages(), stopped=lambda: False)
    started = time.monotonic()
    delivery.close()
    assert time.monotonic() - started < 10
    assert delivery.process.exitcode == 0  # it ended by itself, it was not killed


# --- a lost or damaged send log or journal (issue 8 item 5) ---------------------------


def test_after_a_sigkill_with_the_wal_file_gone_the_journal_still_stops_every_duplicate(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(12)
    project.write_contacts(emails)
    slow_down(smtp_server)
    process = project.spawn_send("--yes")
    try:
        wait_for(lambda: len([s for s in project.peek_statuses().values() if s == "sent"]) >= 3, timeout=30)
    finally:
        process.kill()
        finish(process)
    assert process.returncode == -signal.SIGKILL
    time.sleep(STALL * 3)  # let a transaction cut off by the kill settle at the server
    by_killed_run = set(received_addresses(smtp_server))
    assert by_killed_run and list(tmp_path.glob("*.journal"))
    # What the send log committed since its last checkpoint goes with its -wal file.
    for suffix in ("-wal", "-shm"):
        Path(f"{project.log_path}{suffix}").unlink(missing_ok=True)

    speed_up(smtp_server)
    rerun = project.send("--yes", "--resend-unknown", "--json")

    assert rerun.exit_code == 0, rerun
    received = Counter(received_addresses(smtp_server))
    twice = {address for address, count in received.items() if count > 1}
    # Only a message in flight at the kill (outcome unknown, resent on request) may come twice.
    assert len(twice) <= 1, received
    assert set(received) == set(emails)
    assert project.statuses() == dict.fromkeys(emails, "sent")


def test_an_empty_send_log_is_refused_and_nobody_is_mailed_again(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    emails = addresses(5)
    project.write_contacts(emails)
    assert project.send("--yes").exit_code == 0
    project.log_path.write_bytes(b"")  # emptied (a failed copy, a full disk, a mistake)
    for suffix in ("-wal", "-shm"):
        Path(f"{project.log_path}{suffix}").unlink(missing_ok=True)

    again = project.send("--yes")

    assert again.exit_code == 2, again
    assert "empty file" in again.stderr and "start afresh on purpose" in again.stderr
    assert "Traceback" not in again.stderr
    assert Counter(received_addresses(smtp_server)) == Counter(emails)
    assert project.log_path.read_bytes() == b""  # left as it was


def test_a_file_that_is_not_a_send_log_is_refused_with_how_to_start_afresh(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(2))
    project.log_path.write_bytes(b"\0" * 4096)

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert "not a SQLite database" in outcome.stderr and "start afresh on purpose" in outcome.stderr
    assert received_addresses(smtp_server) == []


def test_a_disk_that_fills_mid_run_ends_with_75_and_says_how_many_were_sent(smtp_server, tmp_path):
    """A file size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ) makes the send log's
    writes fail part-way, as a full disk does: messages went out, so never exit 2."""
    import resource

    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(3000))
    limit = 300_000

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        project._command(("send", str(project.contacts_path), str(project.template_path), "--yes", "--json")),
        cwd=tmp_path,
        env=project._environment(None),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=small_disk,
    )
    summary = json.loads(done.stdout)
    sent = summary["counts"]["sent"]
    assert 0 < sent < 3000, done.stderr
    assert done.returncode == 75, done.stderr
    assert summary["exit_code"] == 75 and "I/O error on the send log" in summary["error"]
    assert f"The run stopped after {sent} messages had been sent" in done.stderr
    assert "Traceback" not in done.stderr
    received = received_addresses(smtp_server)
    assert len(received) == sent + summary["counts"].get("unknown", 0)
