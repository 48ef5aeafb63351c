"""A real send: the campaign's messages through the SMTP pool, every step in the send log.

Order of events for one recipient:
1. the log says whether it is still to be mailed (resume) and whether it is suppressed;
2. the message is built (and DKIM-signed) in the calling thread;
3. ``sending`` is committed to the log just before the SMTP transaction starts;
4. the outcome (``sent`` / ``failed`` / ``deferred``) is committed just after.
A process killed between 3 and 4 leaves ``sending``: outcome unknown, never resent
unless the user asks (``--resend-unknown``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .campaign import Campaign, Problem, Summary
from .contacts import Contact, ContactReader, SeenAddresses, address_key
from .delivery import Outgoing, Result, check_relay_settings, deliver, tls_verification_warning
from .errors import ExitCode, MailerError, SendLogError, UsageError
from .journal import JournalWriter, is_bounce
from .journal import recover as recover_journal
from .sendlog import SendLog, Status, normalize_address
from .signing import SigningPool

__all__ = ["run_send", "unsubscribe_warning"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Statuses that settle a recipient for good. `invalid` and `suppressed` are not here on
# purpose: a row fixed in the CSV, or an address removed from the suppression list,
# is mailed by the next run; the suppression list itself is checked on every run.
_SETTLED = {Status.SENT.value, Status.FAILED.value}


def unsubscribe_warning(job: Campaign) -> str | None:
    """The warning for bulk mail without one-click unsubscribe, or None."""
    if job.unsubscribe_configured or job.config.message.kind == "transactional":
        return None
    return (
        "no unsubscribe is configured: Gmail, Yahoo and Outlook.com junk or reject bulk mail without "
        "one-click unsubscribe. Set [message] list_unsubscribe (an https URL) and/or list_unsubscribe_mailto; "
        "for transactional mail (receipts, password resets) set [message] kind = \"transactional\" instead."
    )


@dataclass
class SendPlan:
    """What a send is about to do, for the confirmation prompt."""

    recipients: int
    settled: int
    unknown: int
    suppressed: int


class _Resume:
    """Decides, per contact, whether an earlier run or the suppression list settles it.

    In-memory prefilters keep this cheap: a point query per contact costs ~30 µs while
    the delivery process is writing the same database, more than building the
    message. A digest hit is confirmed by the real query, so a (rare) false hit
    changes nothing.
    """

    def __init__(self, log: SendLog, campaign: str, *, resend_unknown: bool) -> None:
        self.log = log
        self.campaign = campaign
        self.resend_unknown = resend_unknown
        self.logged = SeenAddresses()
        for recipient in log.iter_recipients(campaign):
            self.logged.add(recipient.encode("utf-8", "surrogatepass"), 1)
        self.suppressed = SeenAddresses()
        for address in log.iter_suppressed_keys():
            self.suppressed.add(address.encode("utf-8", "surrogatepass"), 1)

    def settled_by(self, contact: Contact) -> str | None:
        """``already_done``, ``unknown`` or ``suppressed`` when the contact is not mailed now."""
        recipient = normalize_address(contact.envelope)
        status = None
        if len(self.logged) and self.logged.get(recipient.encode("utf-8", "surrogatepass")) is not None:
            status = self.log.status_of(self.campaign, recipient)
        if status in _SETTLED:
            return "already_done"
        if status == Status.SENDING and not self.resend_unknown:
            return "unknown"
        if (
            len(self.suppressed)
            and self.suppressed.get(contact.envelope.lower().encode("utf-8", "surrogatepass")) is not None
            and self.log.is_suppressed(contact.envelope)
        ):
            return "suppressed"
        return None


def _reread(job: Campaign) -> ContactReader:
    """A second reader over the campaign's contacts (a file, or stdin's spooled copy)."""
    return ContactReader(job.reader.rereadable, email_column=job.email_column, display_name=job.reader.display_name)


def plan_send(job: Campaign, resume: _Resume) -> SendPlan:
    """Count who would be mailed, without rendering (a second, cheap pass over the CSV)."""
    plan = SendPlan(0, 0, 0, 0)
    seen = SeenAddresses()
    with _reread(job) as reader:
        for item in reader:
            if not isinstance(item, Contact):
                continue
            item.variables["campaign"] = job.name
            if job.where is not None and not job.where(item.variables):
                continue
            if seen.add(address_key(item.envelope), item.line) is not None:
                continue
            reason = resume.settled_by(item)
            if reason == "already_done":
                plan.settled += 1
            elif reason == "unknown":
                plan.unknown += 1
            elif reason == "suppressed":
                plan.suppressed += 1
            elif job.limit is None or plan.recipients < job.limit:
                plan.recipients += 1
    return plan


def run_send(
    job: Campaign,
    *,
    reporter: Any,
    confirm: Callable[[str], bool] | None,
    resend_unknown: bool = False,
    signer: Any = None,
    ssl_context: Any = None,
) -> Summary:
    """Send the campaign for real. ``confirm`` (or None: do not ask) sees the plan first."""
    config = job.config
    smtp = config.smtp
    password = smtp.password()
    if smtp.username and smtp.password_env and password is None:
        raise UsageError(
            f"the environment variable {smtp.password_env} (named by [smtp] password_env) is not set.",
            hint=f"Export it first: read -rs {smtp.password_env} && export {smtp.password_env}.",
        )
    if smtp.username and not smtp.password_env:
        raise UsageError(
            "[smtp] username is set but password_env is not.",
            hint="Set password_env = \"MAILER_SMTP_PASSWORD\" (the variable's NAME) and export that variable.",
        )
    check_relay_settings(smtp, password)
    for warning in filter(None, [tls_verification_warning(smtp), unsubscribe_warning(job)]):
        reporter.warning(warning)
    for warning in getattr(signer, "warnings", []) or []:
        reporter.warning(warning)

    if job.reader.rereadable is not None:
        # Find a broken byte or quote anywhere in the list before the first message goes.
        with _reread(job) as reader:
            reader.scan()
    summary = Summary(campaign=job.name, dry_run=False, contacts=job.contacts_name)
    with SendLog.open(config.log.path) as log, log.acquire_lock(job.name) as lock:
        # What a killed run of this campaign left in its journal goes into the log first.
        recover_journal(log, job.name, lock)
        resume = _Resume(log, job.name, resend_unknown=resend_unknown)
        plan = None
        wants_total = reporter.is_terminal and not reporter.quiet  # the bar's total and ETA
        if (confirm is not None or wants_total) and job.reader.rereadable is not None:
            plan = plan_send(job, resume)
        if confirm is not None and plan is not None:
            question = (
                f"Send campaign {job.name!r} to {plan.recipients} recipients through "
                f"{smtp.host}:{smtp.effective_port} ({smtp.security})?"
            )
            notes = []
            if plan.settled:
                notes.append(f"{plan.settled} already settled in earlier runs")
            if plan.unknown:
                notes.append(f"{plan.unknown} with an unknown outcome are left out (--resend-unknown)")
            if plan.suppressed:
                notes.append(f"{plan.suppressed} suppressed")
            if notes:
                question += f" ({'; '.join(notes)})"
            if not confirm(question):
                raise UsageError("not confirmed; nothing was sent.")
        summary.started = time.time()  # the run's time, not the time spent at the prompt
        run_id = log.start_run(job.name, template=str(job.template.path), contacts=job.contacts_name)
        counts = summary.counts
        # Fork before the progress display starts its thread: a child must not inherit
        # a lock (stderr's, say) that a thread of ours held at that instant.
        delivery = _DeliveryProcess(config, password=password, ssl_context=ssl_context, campaign=job.name,
                                    run_id=run_id)
        # DKIM signing costs several times what rendering does: on a machine with more
        # than one core, worker processes sign while this one renders.
        workers = _signing_workers() if signer is not None else 0
        signing = SigningPool(signer, workers) if workers else None
        reporter.start_progress(f"sending {job.name}", plan.recipients if plan is not None else None)
        interrupted = _install_signal_handlers(delivery, reporter)
        progress = _ProgressThread(delivery, reporter)
        try:
            outgoing = _outgoing(job, log, summary, signer=None if signing else signer, resume=resume)
            stream = signing.signed(outgoing) if signing else outgoing
            try:
                produced = delivery.feed(stream, stopped=lambda: interrupted["signal"] is not None)
            finally:
                stream.close()  # a stop leaves it unfinished: count what it still held
            result = delivery.wait()
        finally:
            progress.stop()
            _restore_signal_handlers(interrupted)
            if signing is not None:
                signing.close()  # first: its processes hold copies of the pipe to the delivery process
            delivery.close()
            try:
                # A delivery process that died (killed by the system, say) left its last
                # events in the journal: put them in the log now, not at the next run.
                recover_journal(log, job.name, lock)
            except MailerError as exc:  # the next send or report tries again
                reporter.warning(f"the delivery journal could not be applied yet: {exc}")
            for key, value in delivery.counts().items():
                counts[key] += value
            reporter.update_progress(counts["sent"] + counts["failed"] + counts["deferred"],
                                     {k: counts[k] for k in ("sent", "failed", "deferred")})
            reporter.stop_progress()
            summary.finished = time.time()
            summary.interrupted = interrupted["signal"] is not None
            log.finish_run(run_id, counts=dict(counts), interrupted=summary.interrupted)
        counts["not_attempted"] += result["untouched"] + produced["unsent"] + (signing.dropped if signing else 0)
        counts["deferred"] += result["waiting_retry"]
    return summary


class _Counters:
    """Counts shared between the delivery process (writer) and this one (reader)."""

    NAMES = ("sent", "failed", "deferred", "bounced_suppressed")

    def __init__(self, context: Any) -> None:
        self.values = context.Array("q", len(self.NAMES), lock=False)
        # Only the child's threads write (+= is a read and a write); the parent reads.
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.values[self.NAMES.index(name)] += amount

    def as_dict(self) -> dict[str, int]:
        return {name: self.values[index] for index, name in enumerate(self.NAMES)}


class _DeliveryProcess:
    """The SMTP pool and its log writes in a child process.

    Rendering and delivery both need the CPU, and Python threads share one core (the
    GIL): in one process each slows the other down threefold. So this process renders
    and a forked child delivers; messages cross a pipe in batches (the pipe's buffer is
    the bounded queue between them). The child records ``sending`` and the outcome in
    the delivery journal, and applies it to the send log through its own SQLite
    connection (:mod:`mailer.journal`). It dies with its parent (``PR_SET_PDEATHSIG``),
    so a killed ``mailer send`` stops sending at once, exactly as a single process
    would; the log then says ``sending`` for the messages in flight.
    """

    BATCH = 64  # messages at most per batch
    BATCH_BYTES = 1024 * 1024  # and about this many bytes

    def __init__(self, config: Any, *, password: str | None, ssl_context: Any, campaign: str, run_id: int) -> None:
        context = multiprocessing.get_context("fork")
        self.shared = _Counters(context)
        items_reader, self.items = context.Pipe(duplex=False)
        self.events, events_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_delivery_child,
            args=(items_reader, self.items, events_writer, self.shared, config, password, ssl_context, campaign,
                  run_id),
            name="mailer-delivery",
            daemon=True,
        )
        # Until the child has its own SIGUSR1 handler, a stop request must not kill it
        # (the default action): it inherits "ignore" from here for that instant.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN) if in_main_thread else None
        try:
            self.process.start()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGUSR1, previous)
        items_reader.close()
        events_writer.close()

    def counts(self) -> dict[str, int]:
        return self.shared.as_dict()

    def stop(self) -> None:
        """Ask the child to stop handing out messages (in flight ones finish)."""
        if self.process.pid and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGUSR1)

    def kill(self) -> None:
        if self.process.pid and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)

    def feed(self, outgoing: Iterator[Outgoing], *, stopped: Callable[[], bool]) -> dict[str, int]:
        """Send every message to the child; returns how many were produced but never sent over."""
        batch: list[tuple] = []
        batch_bytes = 0
        unsent = 0
        try:
            for item in outgoing:
                batch.append((item.key, item.sender, item.recipients, item.data, item.message_id, item.smtputf8))
                batch_bytes += len(item.data)
                if len(batch) >= self.BATCH or batch_bytes >= self.BATCH_BYTES:
                    self.items.send(batch)
                    batch = []
                    batch_bytes = 0
                if stopped():
                    break
            if batch and not stopped():
                self.items.send(batch)
                batch = []
            self.items.send(None)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child ended early (a fatal relay error): wait() reports why
        unsent += len(batch)
        return {"unsent": unsent}

    def wait(self) -> dict[str, Any]:
        """The child's final report; raises the child's fatal error in this process."""
        try:
            message = self.events.recv()
        except EOFError:
            self.process.join()
            raise SendLogError(
                f"the delivery process ended unexpectedly (exit code {self.process.exitcode}).",
                hint="The send log holds every outcome it recorded; see `mailer report`, then re-run to resume.",
            ) from None
        kind, payload = message
        if kind == "error":
            error = MailerError(payload["message"])
            error.exit_code = ExitCode(payload["exit_code"])
            error.debug_traceback = payload["traceback"]
            raise error
        return payload

    def close(self) -> None:
        try:
            self.items.close()
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.kill()
            self.process.join()


class _ProgressThread:
    """Redraws progress from the shared counters, also while the renderer waits on the pipe."""

    def __init__(self, delivery: _DeliveryProcess, reporter: Any) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(delivery, reporter), daemon=True)
        self._thread.start()

    def _run(self, delivery: _DeliveryProcess, reporter: Any) -> None:
        while not self._done.wait(0.25):
            counts = delivery.counts()
            reporter.update_progress(counts["sent"] + counts["failed"] + counts["deferred"],
                                     {k: counts[k] for k in ("sent", "failed", "deferred")})

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class _ChildRecorder:
    """The delivery listener in the child: the send log (through the journal) and the shared counts.

    ``on_sending`` returns once its ``sending`` line is in the delivery journal, so it
    is on record before the SMTP transaction starts; the outcome is appended the same
    way. The send log itself is brought up to date from the journal in batches
    (:class:`mailer.journal.JournalWriter`), which costs far less than a commit each.
    """

    thread_safe = True

    def __init__(self, journal: JournalWriter, shared: _Counters) -> None:
        self.journal = journal
        self.shared = shared

    def on_sending(self, item: Outgoing, attempt: int) -> None:
        recipient, line = item.key
        self.journal.append((recipient, Status.SENDING.value, None, None, item.message_id, line))

    def on_result(self, item: Outgoing, result: Result) -> None:
        recipient, _ = item.key
        self.journal.append((recipient, str(result.status), result.smtp_code, result.smtp_reply, item.message_id, None))
        if result.final:
            if is_bounce(result.status, result.smtp_code, result.smtp_reply):
                # The journal's writer suppresses it with the same rule (mailer.journal).
                self.shared.add("bounced_suppressed")
            self.shared.add(result.status)


def _delivery_child(items: Any, items_writer: Any, events: Any, shared: _Counters, config: Any,
                    password: str | None, ssl_context: Any, campaign: str, run_id: int) -> None:
    """Body of the delivery process (runs after fork; reports through ``events``)."""
    # The fork copied the parent's end of the items pipe: without closing it here, a
    # parent that stops feeding on an error (and closes its end) would never be seen
    # to, and this process would wait for more messages.
    items_writer.close()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file still stops us
        pass
    stop = threading.Event()
    # The terminal's Ctrl-C reaches the whole process group: the parent decides, and
    # tells this process with SIGUSR1.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.set())
    untouched = 0
    ended = threading.Event()  # the parent's end marker (or end of file) was read
    left_in_batch = [0]  # items of the batch being unpacked that deliver() has not taken

    def received() -> Iterator[Outgoing]:
        while True:
            try:
                batch = items.recv()
            except EOFError:
                stop.set()
                ended.set()
                return
            if batch is None:
                ended.set()
                return
            left_in_batch[0] = len(batch)
            for key, sender, recipients, data, message_id, smtputf8 in batch:
                left_in_batch[0] -= 1
                yield Outgoing(key=key, sender=sender, recipients=recipients, data=data,
                               message_id=message_id, smtputf8=smtputf8)

    try:
        with SendLog.open(config.log.path) as log:
            journal = JournalWriter(log, campaign, run_id)
            try:
                stats = deliver(received(), smtp=config.smtp, send=config.send, password=password,
                                listener=_ChildRecorder(journal, shared), stop=stop, ssl_context=ssl_context)
            finally:
                journal.close()
        untouched = stats.untouched + left_in_batch[0]
        # Stopped early: take what the parent still sends, so that it never blocks on a full pipe.
        while not ended.is_set():
            try:
                batch = items.recv()
            except EOFError:
                break
            if batch is None:
                ended.set()
                break
            untouched += len(batch)
        events.send(("done", {"untouched": untouched, "waiting_retry": stats.waiting_retry}))
    except BaseException as exc:  # every failure goes to the parent, which reports it
        import traceback

        code = getattr(exc, "exit_code", ExitCode.TEMPFAIL)
        events.send(("error", {"message": str(exc), "exit_code": int(code), "traceback": traceback.format_exc()}))


def _signing_workers() -> int:
    """How many DKIM signing processes: one per core, none on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 4) if cores > 1 else 0


def _outgoing(job: Campaign, log: SendLog, summary: Summary, *, signer: Any, resume: _Resume) -> Iterator[Outgoing]:
    campaign = job.name
    counts = summary.counts

    def skip(contact: Contact) -> bool:
        reason = resume.settled_by(contact)
        if reason is None:
            return False
        counts[reason] += 1
        if reason == "suppressed":
            recipient = normalize_address(contact.envelope)
            log.record_skipped(campaign, recipient, status="suppressed", reason="on the suppression list", line=contact.line)
        return True

    def on_problem(problem: Problem, contact: Contact | None) -> None:
        if problem.kind in ("duplicate", "blank"):
            return  # the address has its own row; a blank row has no recipient
        recipient = normalize_address(contact.envelope) if contact else (problem.email or f"line {problem.line}")
        status = log.status_of(campaign, recipient)
        if status in _SETTLED or status == Status.SENDING:
            return  # never overwrite what happened to a real message
        log.record_skipped(campaign, recipient, status="invalid", reason=problem.reason, line=problem.line)

    for contact, message in job.messages(summary, skip=skip, on_problem=on_problem):
        data = signer.sign(message.data) if signer is not None else message.data
        yield Outgoing(
            key=(normalize_address(contact.envelope), contact.line),
            sender=message.sender,
            recipients=message.recipients,
            data=data,
            message_id=message.message_id,
            smtputf8=message.smtputf8,
        )


def _install_signal_handlers(delivery: _DeliveryProcess, reporter: Any) -> dict[str, Any]:
    """First SIGINT/SIGTERM: stop handing out messages. Second: abort at once."""
    state: dict[str, Any] = {"signal": None, "previous": {}}
    if threading.current_thread() is not threading.main_thread():
        return state

    def handle(signum: int, frame: Any) -> None:
        if state["signal"] is not None:
            # Every event is in the delivery journal before the next step: stopping both
            # processes now loses nothing (at worst some recipients end as `sending`),
            # and the next `mailer report` or `mailer send` applies the journal.
            delivery.kill()
            os.write(2, b"\nmailer: aborted; every outcome is on record (see `mailer report`).\n")
            os._exit(int(ExitCode.INTERRUPTED))
        state["signal"] = signum
        delivery.stop()
        os.write(2, b"\nmailer: stopping: finishing the messages in flight (press Ctrl-C again to abort)...\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        state["previous"][signum] = signal.signal(signum, handle)
    return state


def _restore_signal_handlers(state: dict[str, Any]) -> None:
    for signum, previous in state["previous"].items():
        signal.signal(signum, previous)
