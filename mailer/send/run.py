"""A real send: plan, confirm, then the campaign's messages through the delivery process.

Order of events for one recipient:
1. the store says whether it is still to be mailed (resume) and whether it is suppressed;
2. the message is built (and DKIM-signed, in the signing processes) in this process;
3. the delivery process appends ``sending`` to the journal just before the SMTP transaction;
4. and the outcome (``sent`` / ``failed`` / ``deferred``) just after.
A process killed between 3 and 4 leaves ``sending``: outcome unknown, never resent
unless the user asks (``--resend-unknown``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..compose.campaign import Campaign, Problem, Summary, unsubscribe_warning
from ..compose.contacts import Contact, ContactReader
from ..compose.seen import SeenAddresses
from ..core.addresses import address_key
from ..core.errors import MailerError, StoreUnavailableError, TemporaryDeliveryError, UsageError
from ..core.outcomes import Outgoing, Skip, Status
from ..delivery.routes import Route, relays_of, select_route
from ..smtp.policy import check_relay_settings, tls_verification_warning
from ..store import open_store
from ..store.base import SendStore
from ..store.records import SkippedRow
from ..web.serve import base_url_warning
from .child import Cooperation, DeliveryProcess, SendKey
from .coop import Claims
from .estimate import estimate_send
from .interrupts import install_signal_handlers, restore_signal_handlers
from .journal import recover, recover_run_journals, run_journal_path
from .resume import BATCH, Resume
from .retry import absolute_contacts_name
from .signing import Signing

if TYPE_CHECKING:
    from ..store.pg_work import CampaignWork
    from ..store.postgres import PostgresStore

__all__ = ["SendPlan", "plan_send", "run_send"]


@dataclass
class SendPlan:
    """What a send is about to do, for the confirmation prompt (``domains``: the
    recipients to be mailed, by destination domain)."""

    recipients: int
    settled: int
    unknown: int
    suppressed: int
    domains: Counter[str] = field(default_factory=Counter)


def _reread(campaign: Campaign) -> ContactReader:
    """A second reader over the campaign's contacts (a file, or stdin's spooled copy)."""
    source = campaign.reader.rereadable
    if source is None:  # stdin that was not spooled; a send always spools it
        raise UsageError("the contacts from stdin cannot be read a second time.")
    return ContactReader(source, email_column=campaign.email_column, display_name=campaign.reader.display_name)


def plan_send(campaign: Campaign, resume: Resume) -> SendPlan:
    """Count who would be mailed, without rendering (a second, cheap pass over the CSV)."""
    plan = SendPlan(0, 0, 0, 0)
    seen = SeenAddresses()

    def selected(reader: ContactReader) -> Iterator[Contact]:
        for item in reader:
            if not isinstance(item, Contact):
                continue
            item.variables["campaign"] = campaign.name
            if campaign.where is not None and not campaign.where(item.variables):
                continue
            if seen.add(address_key(item.envelope).encode("utf-8", "surrogatepass"), item.line) is not None:
                continue
            yield item

    try:
        with _reread(campaign) as reader:
            for contact, reason in resume.settle(selected(reader)):
                if reason is Skip.ALREADY_DONE:
                    plan.settled += 1
                elif reason is Skip.UNKNOWN:
                    plan.unknown += 1
                elif reason is Skip.SUPPRESSED:
                    plan.suppressed += 1
                elif campaign.limit is None or plan.recipients < campaign.limit:
                    plan.recipients += 1
                    plan.domains[contact.envelope.rpartition("@")[2].lower()] += 1
    finally:
        seen.close()
    return plan


def run_send(
    campaign: Campaign,
    *,
    reporter: Any,
    confirm: Callable[[str], bool] | None,
    resend_unknown: bool = False,
    signer: Any = None,
    ssl_context: Any = None,
    debug: bool = False,
    route: Route | None = None,
) -> Summary:
    """Send the campaign for real. ``confirm`` (or None: do not ask) sees the plan first.

    ``route``: the stream's relays, source addresses and HELO (default: :func:`select_route`
    of the config, without ``--stream``).

    ``debug``: the SMTP conversation goes to stderr (AUTH and the password redacted)."""
    config = campaign.config
    route = route or select_route(config)
    # A direct stream has no relay: the delivery process runs the direct engine instead
    # (mailer.send.direct_child), to each recipient domain's MX hosts.
    direct = None
    if route.direct:
        from .direct_child import direct_settings

        direct = direct_settings(config, route)
    relays = relays_of(route, passwords={relay.name: relay.smtp.password() for relay in route.relays})
    for relay in relays:
        check_relay_settings(relay.smtp, relay.password, section=relay.section)
    unsubscribe = unsubscribe_warning(config.message, config.web)
    tls_warnings = {
        warning for relay in relays if (warning := tls_verification_warning(relay.smtp, section=relay.section))
    }
    plain_http = base_url_warning(config.web.base_url) if config.web is not None else None
    for warning in [
        *sorted(tls_warnings),
        *([" ".join(unsubscribe)] if unsubscribe else []),
        *([plain_http] if plain_http else []),
    ]:
        reporter.warning(warning)
    for warning in getattr(signer, "warnings", []) or []:
        reporter.warning(warning)

    if campaign.reader.rereadable is not None:
        # Find a broken byte or quote anywhere in the list before the first message goes.
        with _reread(campaign) as reader:
            reader.scan()
    summary = Summary(campaign_name=campaign.name, dry_run=False, contacts=campaign.contacts_name)
    # PostgreSQL: several runs of the campaign share its work (mailer.store.pg_work);
    # SQLite: one run at a time (the campaign lock).
    cooperating = config.log.url is not None
    fingerprint: tuple[str, int] | None = None
    if cooperating:
        from ..store.pg_work import contacts_fingerprint

        if campaign.reader.rereadable is None:
            raise UsageError("cooperating runs read the contacts twice; give a file, not unspooled stdin.")
        fingerprint = contacts_fingerprint(campaign.reader.rereadable)
    with open_store(config.log) as log, nullcontext(None) if cooperating else log.acquire_lock(campaign.name) as lock:
        # What a killed run of this campaign left in its journal goes into the log first.
        recover(log, campaign.name, lock)
        if cooperating:
            from ..store.pg_work import CampaignWork

            assert fingerprint is not None
            CampaignWork.check_contacts(cast("PostgresStore", log), campaign.name, fingerprint[0])
            recover_run_journals(log, campaign.name)  # dead runs' of this host (live ones are locked)
        resume = Resume(log, campaign.name, resend_unknown=resend_unknown)
        plan = None
        wants_total = reporter.shows_bar  # the bar's total and ETA
        if (confirm is not None or wants_total) and campaign.reader.rereadable is not None:
            plan = plan_send(campaign, resume)
        if confirm is not None and plan is not None:
            question = f"Send campaign {campaign.name!r} to {plan.recipients} recipients through {route.describe()}?"
            notes = []
            if plan.settled:
                notes.append(f"{plan.settled} already settled in earlier runs")
            if plan.unknown:
                notes.append(f"{plan.unknown} with an unknown outcome are left out (--resend-unknown)")
            if plan.suppressed:
                notes.append(f"{plan.suppressed} suppressed")
            if notes:
                question += f" ({'; '.join(notes)})"
            estimate = estimate_send(plan.domains, route=route, config=config)
            question = f"Destinations: {estimate.describe()}.\n{question}"
            if not confirm(question):
                raise UsageError("not confirmed; nothing was sent.")
        summary.started = time.time()  # the run's time, not the time spent at the prompt
        # The contacts' absolute path: `report --failed` reads the rows again from it.
        run_id = log.start_run(
            campaign.name,
            template=str(campaign.template.path),
            contacts=absolute_contacts_name(campaign.reader.source),
        )
        counts = summary.counts
        work: CampaignWork | None = None
        cooperation = None
        if cooperating:
            assert fingerprint is not None
            try:
                work = CampaignWork.join(
                    cast("PostgresStore", log),
                    campaign.name,
                    run_id,
                    fingerprint=fingerprint[0],
                    lines=fingerprint[1],
                    contacts=campaign.contacts_name,
                    lease=config.log.lease,
                )
            except BaseException:
                log.finish_run(run_id, counts={}, interrupted=False)
                raise
            # Rows are settled a chunk at a time: a batch of 500 would read (and claim) far
            # ahead of what this run sends, leaving the others nothing.
            resume.batch = work.chunk_lines
            cooperation = Cooperation(
                journal_path=run_journal_path(log, campaign.name, run_id),
                chunk_lines=work.chunk_lines,
            )
        # Fork before the progress display starts its thread: a child must not inherit
        # a lock (stderr's, say) that a thread of ours held at that instant.
        delivery = DeliveryProcess(
            config,
            relays=relays,
            ssl_context=ssl_context,
            campaign=campaign.name,
            run_id=run_id,
            source_addresses=route.source_addresses,
            helo=route.helo,
            debug=debug,
            cooperation=cooperation,
            direct=direct,
        )
        # DKIM signing costs several times what rendering does: on a machine with more
        # than one core, worker processes sign while this one renders.
        signing = Signing(signer) if signer is not None else None
        reporter.start_progress(f"sending {campaign.name}", plan.recipients if plan is not None else None)
        interrupted = install_signal_handlers(delivery, reporter)
        progress = _ProgressThread(delivery, reporter)
        result: dict[str, Any] | None = None
        stopped_by: MailerError | None = None
        claims = None
        if work is not None:
            # Once --limit is reached this run takes no more of the list (the rest is the others').
            # A new chunk only once the relay has started most of what this run holds: a
            # run never sits on much of the list that the others could be sending.
            claims = Claims(
                work,
                stopped=lambda: interrupted["signal"] is not None or counts["over_limit"] > 0,
                backlog=delivery.backlog,
                max_backlog=max(4 * config.send.connections, 2 * work.chunk_lines),
            )
        try:
            outgoing = _outgoing(campaign, log, summary, resume=resume, claims=claims)
            stream = signing.signed(outgoing) if signing else outgoing
            try:
                delivery.feed(stream, stopped=lambda: interrupted["signal"] is not None)
            except MailerError as exc:  # a signing process died, the send log is full, ...
                stopped_by = exc
            finally:
                stream.close()  # a stop leaves it unfinished: count what it still held
                outgoing.close()  # and record the skipped rows it still held, store open
            try:
                result = delivery.wait()
            except MailerError as exc:  # the delivery process died or hit a fatal error
                stopped_by = stopped_by or exc
            if result is not None and result.get("unreachable") and stopped_by is None:
                stopped_by = TemporaryDeliveryError(
                    f"the relay{'s' if len(relays) > 1 else ''} could not be reached: {result['unreachable']}; "
                    "no more messages were handed out (those left are not attempted)."
                )
        finally:
            progress.stop()
            restore_signal_handlers(interrupted)
            if signing is not None:
                signing.close()  # first: its processes hold copies of the pipe to the delivery process
            delivery.close()
            try:
                # A delivery process that died (killed by the system, say) left its last
                # events in the journal: put them in the log now, not at the next run.
                if cooperating:
                    recover_run_journals(log, campaign.name)
                else:
                    recover(log, campaign.name, lock)
            except MailerError as exc:  # the next send or report tries again
                reporter.warning(f"the delivery journal could not be applied yet: {exc}")
            shared = delivery.counts()
            for key in ("sent", "failed", "deferred", "unknown", "bounced_suppressed"):
                counts[key] += shared[key]
            reporter.update_progress(
                counts["sent"] + counts["failed"] + counts["deferred"],
                {k: counts[k] for k in ("sent", "failed", "deferred")},
            )
            reporter.stop_progress()
            summary.finished = time.time()
            summary.interrupted = interrupted["signal"] is not None
            if stopped_by is not None:
                _account_for_stop(summary, stopped_by, delivery, shared, result)
            dropped = signing.dropped if signing else 0
            if work is not None:
                # Every row of its chunks handled: they are done; else the others (or the
                # next run) take them again, and the resume rule skips what was settled.
                complete = (
                    stopped_by is None
                    and not summary.interrupted
                    and result is not None
                    and not (result["untouched"] or result["waiting_retry"] or delivery.unsent or dropped)
                    and not (resume.waiting or counts["over_limit"])
                )
                try:
                    work.finish(complete=complete)
                except MailerError as exc:
                    work.abandon()
                    reporter.warning(f"this run's share of the campaign could not be handed back: {exc}")
            try:
                log.finish_run(run_id, counts=dict(counts), interrupted=summary.interrupted)
            except MailerError as exc:
                if stopped_by is None:
                    raise
                reporter.warning(f"the end of the run could not be recorded: {exc}")
        if result is not None:
            counts["not_attempted"] += result["untouched"] + delivery.unsent + dropped + resume.waiting
            counts["deferred"] += result["waiting_retry"]
            if len(relays) > 1:
                summary.sent_by_relay = dict(result["sent_by_relay"])
                for name, (error, still_down) in result["relay_troubles"].items():
                    if still_down:
                        reporter.warning(
                            f"relay {name} could not be reached ({error}); its messages went to the other relays."
                        )
                    else:
                        reporter.warning(
                            f"relay {name} could not be reached for a while ({error}); its messages went to the "
                            "other relays until a probe found it back."
                        )
        else:
            counts["not_attempted"] += dropped + resume.waiting
    return summary


def _account_for_stop(
    summary: Summary,
    error: MailerError,
    delivery: DeliveryProcess,
    shared: dict[str, int],
    result: dict[str, Any] | None,
) -> None:
    """A run ended by an error after it started: count what is left, say what was sent.

    Without the delivery process's own report (it died), its counts say what became of
    the messages it was given: a final outcome, a transaction cut off (``sending``:
    unknown), a retry pending (deferred), or nothing yet (not attempted).
    """
    counts = summary.counts
    if result is None:
        final = shared["sent"] + shared["failed"] + shared["deferred"] + shared["unknown"]
        counts["unknown"] += shared["in_flight"]
        counts["deferred"] += shared["retrying"]
        counts["not_attempted"] += max(0, delivery.fed - final - shared["in_flight"] - shared["retrying"])
        counts["not_attempted"] += delivery.unsent
    summary.stopped_by = str(error)
    summary.stopped_exit_code = error.exit_code
    summary.stopped_by_lost_store = isinstance(error, StoreUnavailableError)
    summary.debug_traceback = getattr(error, "debug_traceback", None)


class _ProgressThread:
    """Redraws progress from the shared counters, also while the renderer waits on the pipe."""

    def __init__(self, delivery: DeliveryProcess, reporter: Any) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(delivery, reporter), daemon=True)
        self._thread.start()

    def _run(self, delivery: DeliveryProcess, reporter: Any) -> None:
        while not self._done.wait(0.25):
            counts = delivery.counts()
            reporter.update_progress(
                counts["sent"] + counts["failed"] + counts["deferred"],
                {k: counts[k] for k in ("sent", "failed", "deferred")},
            )

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _outgoing(
    campaign: Campaign, store: SendStore, summary: Summary, *, resume: Resume, claims: Claims | None = None
) -> Generator[Outgoing[SendKey], None, None]:
    campaign_name = campaign.name
    skipped: list[SkippedRow] = []  # recorded in batches, like everything else

    def on_skipped(contact: Contact, reason: Skip) -> None:
        if reason is Skip.SUPPRESSED:
            skipped.append(SkippedRow(contact.envelope, Status.SUPPRESSED, "on the suppression list", contact.line))
            if len(skipped) >= BATCH:
                flush()

    def on_problem(problem: Problem, contact: Contact | None) -> None:
        if problem.kind in ("duplicate", "blank"):
            return  # the address has its own row; a blank row has no recipient
        recipient = contact.envelope if contact else problem.email
        # The store never lets this overwrite what happened to a real message.
        skipped.append(SkippedRow(recipient, Status.INVALID, problem.reason, problem.line))
        if len(skipped) >= BATCH:
            flush()

    def flush() -> None:
        store.record_skipped(campaign_name, skipped)
        skipped.clear()

    if claims is None:
        messages = campaign.messages(summary, settle=resume.settle, on_skipped=on_skipped, on_problem=on_problem)
        try:
            for contact, message in messages:
                # As written: the store keys it (mailer.core.addresses.address_key).
                yield message.outgoing((contact.envelope, contact.line))
        finally:
            messages.close()  # now, so that the contacts it read ahead are counted (Resume.waiting)
            flush()
        return
    # Cooperating runs: pass after pass over the file, the rows of the chunks this run holds.
    reader: ContactReader | None = None
    try:
        while True:
            messages = campaign.messages(
                summary,
                settle=resume.settle,
                on_skipped=on_skipped,
                on_problem=on_problem,
                keep=claims.keep,
                reader=reader,
            )
            try:
                for contact, message in messages:
                    yield message.outgoing((contact.envelope, contact.line))
            finally:
                messages.close()
                flush()
            if reader is not None:
                reader.close()
                reader = None
            if not claims.next_pass():
                return
            reader = _reread(campaign)
    finally:
        if reader is not None:
            reader.close()
