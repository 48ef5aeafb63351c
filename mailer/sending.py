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

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .campaign import Campaign, Problem, Summary
from .contacts import Contact, ContactReader, SeenAddresses, address_key
from .delivery import Outgoing, Result, check_relay_settings, deliver, is_hard_bounce, tls_verification_warning
from .errors import ExitCode, UsageError
from .sendlog import SendLog, Status, normalize_address

__all__ = ["run_send", "SendPlan", "plan_send", "unsubscribe_warning"]

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


def plan_send(job: Campaign, log: SendLog, *, resend_unknown: bool) -> SendPlan:
    """Count who would be mailed, without rendering (a second, cheap pass over the CSV)."""
    plan = SendPlan(0, 0, 0, 0)
    seen = SeenAddresses()
    with ContactReader(job.reader.source, email_column=job.email_column) as reader:
        for item in reader:
            if not isinstance(item, Contact):
                continue
            item.variables["campaign"] = job.name
            if job.where is not None and not job.where(item.variables):
                continue
            if seen.add(address_key(item.envelope), item.line) is not None:
                continue
            status = log.status_of(job.name, normalize_address(item.envelope))
            if status in _SETTLED:
                plan.settled += 1
            elif status == Status.SENDING and not resend_unknown:
                plan.unknown += 1
            elif log.is_suppressed(item.envelope):
                plan.suppressed += 1
            elif job.limit is None or plan.recipients < job.limit:
                plan.recipients += 1
    return plan


class _Recorder:
    """The delivery listener: writes the log and keeps the run's counts."""

    def __init__(self, job: Campaign, log: SendLog, summary: Summary, progress: Callable[[], None]) -> None:
        self.job = job
        self.log = log
        self.summary = summary
        self.progress = progress
        self.lines: dict[object, int] = {}

    def on_sending(self, item: Outgoing, attempt: int) -> None:
        recipient, line = item.key
        self.log.mark_sending(self.job.name, recipient, message_id=item.message_id, line=line)

    def on_result(self, item: Outgoing, result: Result) -> None:
        recipient, _ = item.key
        self.log.record_result(
            self.job.name,
            recipient,
            status=result.status,
            smtp_code=result.smtp_code,
            smtp_reply=result.smtp_reply,
            message_id=item.message_id,
        )
        if not result.final:
            return
        self.summary.counts[result.status] += 1
        if result.status == Status.FAILED and result.smtp_code and is_hard_bounce(result.smtp_code, result.smtp_reply):
            # A "user unknown" reply will not change: never mail this address again.
            self.log.add_suppressions(
                [recipient], reason=f"{result.smtp_code} {result.smtp_reply}"[:500], source="bounce"
            )
            self.summary.counts["bounced_suppressed"] += 1
        self.progress()


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

    if job.reader.source != "-":
        # Find a broken byte or quote anywhere in the file before the first message goes.
        with ContactReader(job.reader.source, email_column=job.email_column) as reader:
            reader.scan()
    summary = Summary(campaign=job.name, dry_run=False, contacts=job.contacts_name)
    with SendLog.open(config.log.path) as log, log.acquire_lock(job.name):
        plan = None
        if confirm is not None and job.reader.source != "-":
            plan = plan_send(job, log, resend_unknown=resend_unknown)
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
        run_id = log.start_run(job.name, template=str(job.template.path), contacts=job.contacts_name)
        stop = threading.Event()
        interrupted = _install_signal_handlers(stop, reporter)
        reporter.start_progress(f"sending {job.name}", plan.recipients if plan is not None else None)
        counts = summary.counts

        def progress() -> None:
            # Every time: the reporter itself decides when to redraw (a plain line every
            # 10 seconds must not wait for a multiple of some count at a slow rate).
            done = counts["sent"] + counts["failed"] + counts["deferred"]
            reporter.update_progress(done, {k: counts[k] for k in ("sent", "failed", "deferred")})

        recorder = _Recorder(job, log, summary, progress)
        try:
            stats = deliver(
                _outgoing(job, log, summary, signer=signer, resend_unknown=resend_unknown),
                smtp=smtp,
                send=config.send,
                password=password,
                listener=recorder,
                stop=stop,
                ssl_context=ssl_context,
            )
        finally:
            progress()  # the bar ends on the real counts
            reporter.stop_progress()
            _restore_signal_handlers(interrupted)
            summary.finished = time.time()
            summary.interrupted = interrupted["signal"] is not None
            log.finish_run(run_id, counts=dict(counts), interrupted=summary.interrupted)
        counts["not_attempted"] += stats.untouched
        counts["deferred"] += stats.waiting_retry
    return summary


def _outgoing(job: Campaign, log: SendLog, summary: Summary, *, signer: Any, resend_unknown: bool) -> Iterator[Outgoing]:
    campaign = job.name
    counts = summary.counts

    def skip(contact: Contact) -> bool:
        recipient = normalize_address(contact.envelope)
        status = log.status_of(campaign, recipient)
        if status in _SETTLED:
            counts["already_done"] += 1
            return True
        if status == Status.SENDING and not resend_unknown:
            counts["unknown"] += 1
            return True
        if log.is_suppressed(contact.envelope):
            counts["suppressed"] += 1
            log.record_skipped(campaign, recipient, status="suppressed", reason="on the suppression list", line=contact.line)
            return True
        return False

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


def _install_signal_handlers(stop: threading.Event, reporter: Any) -> dict[str, Any]:
    """First SIGINT/SIGTERM: stop handing out messages. Second: abort at once."""
    state: dict[str, Any] = {"signal": None, "previous": {}}
    if threading.current_thread() is not threading.main_thread():
        return state

    def handle(signum: int, frame: Any) -> None:
        if state["signal"] is not None:
            # Every log write is its own committed transaction: exiting now leaves the
            # log consistent (at worst some rows say `sending`).
            os.write(2, b"\nmailer: aborted; the send log is consistent (see `mailer report`).\n")
            os._exit(int(ExitCode.INTERRUPTED))
        state["signal"] = signum
        stop.set()
        os.write(2, b"\nmailer: stopping: finishing the messages in flight (press Ctrl-C again to abort)...\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        state["previous"][signum] = signal.signal(signum, handle)
    return state


def _restore_signal_handlers(state: dict[str, Any]) -> None:
    for signum, previous in state["previous"].items():
        signal.signal(signum, previous)
