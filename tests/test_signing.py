"""DKIM signing in worker processes: order kept, signatures verify, stops and errors accounted for."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import dkim
import pytest
from send_support import MAILER, Project, addresses, received_addresses, wait_for

from mailer.core.config import DKIMConfig
from mailer.core.errors import DKIMError, ProcessEndedError
from mailer.core.outcomes import Outgoing
from mailer.dkim.signer import DKIMSigner
from mailer.send import signing as signing_module
from mailer.send.signing import BATCH, SigningPool

DOMAIN = "acme.example"
SELECTOR = "pool"


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "rsa.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def signer(key) -> DKIMSigner:
    return DKIMSigner.load(DKIMConfig(domain=DOMAIN, selector=SELECTOR, private_key=key))


def verifies(data: bytes, signer: DKIMSigner) -> bool:
    name, value = signer.dns_record()
    return dkim.verify(
        data, dnsfunc=lambda qname, timeout=5: value.encode() if qname.decode().rstrip(".") == name else None
    )


def item(n: int) -> Outgoing:
    data = (f"From: a@{DOMAIN}\r\nTo: user{n}@example.com\r\nSubject: n{n}\r\n\r\nmessage {n}\r\n").encode()
    return Outgoing(key=n, sender=f"a@{DOMAIN}", recipients=[f"user{n}@example.com"], data=data, message_id=f"<{n}@x>")


def test_the_pool_signs_every_message_and_keeps_their_order(signer):
    pool = SigningPool(signer, 2)
    try:
        count = BATCH * 5 + 3  # several rounds, and a last partial batch
        out = list(pool.signed(iter([item(n) for n in range(count)])))
    finally:
        pool.close()
    assert [o.key for o in out] == list(range(count))
    for o in out:
        assert o.data.startswith(b"DKIM-Signature:") and f"message {o.key}\r\n".encode() in o.data
        assert verifies(o.data, signer)
    assert pool.dropped == 0


def test_a_consumer_that_stops_early_is_told_how_many_messages_the_pool_still_held(signer):
    pool = SigningPool(signer, 2)
    taken_in = []

    def source():
        for n in range(200):
            taken_in.append(n)
            yield item(n)

    try:
        stream = pool.signed(source())
        given = [next(stream) for _ in range(5)]
        stream.close()
    finally:
        pool.close()
    assert [g.key for g in given] == [0, 1, 2, 3, 4]
    # Everything it read from the source is either given back or counted as dropped.
    assert len(given) + pool.dropped == len(taken_in)
    assert pool.dropped > 0


def test_a_message_the_signer_refuses_is_a_dkim_error(signer):
    pool = SigningPool(signer, 2)
    bad = Outgoing(
        key="x",
        sender=f"a@{DOMAIN}",
        recipients=["x@example.com"],
        data=b"Subject: no From\r\n\r\nhi\r\n",
        message_id="<x@x>",
    )
    try:
        with pytest.raises(DKIMError) as caught:
            list(pool.signed(iter([item(0), bad])))
    finally:
        pool.close()
    assert "From" in str(caught.value)


def test_a_signed_send_through_the_pool_gives_each_recipient_their_own_message(smtp_server, tmp_path, key, signer):
    project = Project(tmp_path, smtp_server)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)})
    emails = addresses(BATCH * 3 + 5)
    project.write_contacts(emails)
    if signing_module.signing_workers() == 0:
        pytest.skip("one core: no signing processes")

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(smtp_server)) == emails
    for message in smtp_server.messages:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        assert [parsed["To"].addresses[0].addr_spec] == message.rcpt_tos  # the order was kept
        assert verifies(message.data, signer)


def test_on_one_core_the_send_signs_in_process(smtp_server, tmp_path, key, signer, monkeypatch):
    monkeypatch.setattr(signing_module.os, "sched_getaffinity", lambda pid: {0})
    assert signing_module.signing_workers() == 0
    project = Project(tmp_path, smtp_server)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)})
    emails = addresses(5)
    project.write_contacts(emails)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert all(verifies(message.data, signer) for message in smtp_server.messages)


def test_an_interrupted_signed_send_accounts_for_every_row(smtp_server, tmp_path, key):
    project = Project(tmp_path, smtp_server)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)}, send={"connections": 1})
    emails = addresses(300)
    project.write_contacts(emails)
    handler = smtp_server._controller.handler
    accept = type(handler).handle_DATA

    async def slow_data(smtp, session, envelope):
        import asyncio

        await asyncio.sleep(0.05)
        return await accept(handler, smtp, session, envelope)

    handler.handle_DATA = slow_data
    process = project.spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=30)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    counts = json.loads(stdout)["counts"]
    assert counts["sent"] == len(received_addresses(smtp_server)) < len(emails)
    assert counts["sent"] + counts.get("deferred", 0) + counts["not_attempted"] == counts["rows"], counts


def test_large_messages_go_through_without_the_pipes_filling_up(signer):
    """Messages of 300 KB (an attachment, say): batches are cut by size, and no worker
    is handed a batch while its result may still be waiting in the pipe."""
    body = ("x" * 998 + "\r\n") * 300
    items = [
        Outgoing(
            key=n,
            sender=f"a@{DOMAIN}",
            recipients=[f"u{n}@example.com"],
            message_id=f"<{n}@x>",
            data=(f"From: a@{DOMAIN}\r\nTo: u{n}@example.com\r\nSubject: big {n}\r\n\r\n" + body).encode(),
        )
        for n in range(70)
    ]
    pool = SigningPool(signer, 2)
    out: list[Outgoing] = []
    consumer = threading.Thread(target=lambda: out.extend(pool.signed(iter(items))), daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    deadlocked = consumer.is_alive()
    if deadlocked:  # unblock the pipes so that the test ends
        for process in pool._processes:
            process.kill()
        consumer.join(timeout=10)
    pool.close()
    assert not deadlocked, "the parent and a signing process were each waiting for the other"
    assert [o.key for o in out] == list(range(70))
    assert all(verifies(o.data, signer) for o in out[::23])


# ---------------------------------------------------------------- the dry run signs


def mbox_messages(data: bytes) -> list[bytes]:
    """The messages of an mboxrd stream, with the CRLF line endings they are sent with."""
    chunks = [chunk for chunk in re.split(rb"^From MAILER-DAEMON [^\n]*\n", data, flags=re.MULTILINE) if chunk]
    return [re.sub(rb"^>(>*From )", rb"\1", chunk[:-1], flags=re.MULTILINE).replace(b"\n", b"\r\n") for chunk in chunks]


def test_a_dry_run_writes_signed_messages_that_verify(tmp_path, key, signer):
    project = Project(tmp_path)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)})
    emails = addresses(BATCH * 2 + 3)
    project.write_contacts(emails)

    outcome = subprocess.run(
        [
            *MAILER,
            "send",
            str(project.contacts_path),
            str(project.template_path),
            "--dry-run",
            "-c",
            str(project.config_path),
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
    )

    assert outcome.returncode == 0, outcome.stderr
    messages = mbox_messages(outcome.stdout)
    assert len(messages) == len(emails)
    for address, data in zip(emails, messages):  # in the order of the list
        assert data.startswith(b"DKIM-Signature:")
        assert email.message_from_bytes(data, policy=email.policy.default)["To"].addresses[0].addr_spec == address
        assert verifies(data, signer)


def test_a_dry_run_on_one_core_signs_in_process(tmp_path, key, signer, monkeypatch):
    monkeypatch.setattr(signing_module.os, "sched_getaffinity", lambda pid: {0})
    assert signing_module.signing_workers() == 0
    project = Project(tmp_path)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)})
    project.write_contacts(addresses(5))
    out = tmp_path / "review"

    outcome = project.send("--dry-run", "--output", str(out))

    assert outcome.exit_code == 0, outcome
    files = sorted(out.glob("*.eml"))
    assert len(files) == 5
    assert all(verifies(path.read_bytes(), signer) for path in files)


@pytest.mark.parametrize("broken", ["missing", "garbage"])
def test_a_dry_run_with_a_bad_key_exits_2_like_a_real_send(tmp_path, broken):
    bad = tmp_path / "dkim.pem"
    if broken == "garbage":
        bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
        bad.chmod(0o600)
    project = Project(tmp_path)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(bad)})
    project.write_contacts(addresses(3))

    rehearsal = project.send("--dry-run")
    real = project.send("--yes")

    assert rehearsal.exit_code == real.exit_code == 2, rehearsal
    assert str(bad) in rehearsal.stderr and "DKIM" in rehearsal.stderr
    assert rehearsal.stderr == real.stderr  # the same clear message
    assert "From MAILER-DAEMON" not in rehearsal.stdout and "Traceback" not in rehearsal.stderr


def test_a_dead_signing_process_is_a_clear_error_not_a_broken_pipe(signer):
    """A worker killed while it held no batch: the next batch handed to it meets a
    broken pipe, which must not pass for the delivery process's pipe breaking (that
    one the feeder takes as "the delivery process ended on its own", and waits)."""
    pool = SigningPool(signer, 2)
    try:
        victim = pool._processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        started = time.monotonic()
        with pytest.raises(ProcessEndedError) as caught:
            list(pool.signed(iter([item(n) for n in range(BATCH * 8)])))
        assert time.monotonic() - started < 5
    finally:
        pool.close()
    assert f"pid {victim.pid}" in str(caught.value) and "killed by signal 9" in str(caught.value)
    assert pool.dropped > 0  # what it held is counted, not lost


def _signing_processes(pid: int) -> list[int]:
    """The children of ``pid`` with one thread: the signers (the delivery process runs several)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        children += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    single = []
    for child in children:
        status = Path(f"/proc/{child}/status").read_text()
        if "\nThreads:\t1\n" in status:
            single.append(child)
    return single


def test_a_killed_signing_process_ends_the_send_promptly_with_75_and_releases_the_lock(smtp_server, tmp_path, key):
    if signing_module.signing_workers() == 0:
        pytest.skip("one core: no signing processes")
    project = Project(tmp_path, smtp_server)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)}, send={"connections": 1})
    # More than the delivery process queues (1,000), so that the renderer is blocked on
    # a full pipe with its signers idle when one of them is killed.
    emails = addresses(1400)
    project.write_contacts(emails)
    handler = smtp_server._controller.handler
    accept = type(handler).handle_DATA
    delay = [0.05]

    async def slow_data(smtp, session, envelope):
        import asyncio

        await asyncio.sleep(delay[0])
        return await accept(handler, smtp, session, envelope)

    handler.handle_DATA = slow_data
    process = project.spawn_send("--yes", "--json")
    try:
        wait_for(lambda: "sent" in project.peek_statuses().values(), timeout=30)
        signers = wait_for(lambda: _signing_processes(process.pid), timeout=10)
        # The renderer is blocked writing to the delivery process's full pipe, with the
        # signers' last results waiting for it: the killed one has no batch in flight.
        wait_for(lambda: Path(f"/proc/{process.pid}/wchan").read_text() == "anon_pipe_write", timeout=30)
        time.sleep(0.5)
        os.kill(signers[0], signal.SIGKILL)
        delay[0] = 0.0
        killed = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 75, stderr
    assert elapsed < 20, elapsed
    assert f"a DKIM signing process (pid {signers[0]}) ended unexpectedly (killed by signal 9)" in stderr
    summary = json.loads(stdout)
    counts = summary["counts"]
    received = received_addresses(smtp_server)
    assert counts["sent"] == len(received) and len(set(received)) == len(received)
    assert f"The run stopped after {counts['sent']} messages had been sent" in stderr
    assert counts["not_attempted"] > 0, counts
    assert counts["sent"] + counts.get("deferred", 0) + counts["not_attempted"] == counts["rows"], counts
    assert summary["error"] and summary["exit_code"] == 75
    assert not list(tmp_path.glob("*.journal"))  # the journal was applied
    assert set(project.statuses().values()) <= {"sent", "deferred"}

    rerun = project.send("--yes")  # the lock was released: the next run resumes
    assert rerun.exit_code == 0, rerun
    assert sorted(received_addresses(smtp_server)) == sorted(emails)


def test_signing_processes_are_one_per_core_up_to_four_and_can_be_set(monkeypatch):
    monkeypatch.delenv("MAILER_DKIM_WORKERS", raising=False)
    monkeypatch.setattr(signing_module.os, "sched_getaffinity", lambda pid: {0, 1})
    assert signing_module.signing_workers() == 2
    monkeypatch.setattr(signing_module.os, "sched_getaffinity", lambda pid: {0})
    assert signing_module.signing_workers() == 0
    monkeypatch.setattr(signing_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert signing_module.signing_workers() == 4
    monkeypatch.setenv("MAILER_DKIM_WORKERS", "0")
    assert signing_module.signing_workers() == 0
    monkeypatch.setenv("MAILER_DKIM_WORKERS", "lots")
    assert signing_module.signing_workers() == 4
