"""The command line: parse options, call one library function, render its result.

Errors become exit codes in one place (:func:`handle_errors`): a :class:`MailerError`
is printed as one paragraph on stderr and exits with its code; a traceback is shown
only with ``--debug``. The SMTP password is never an argument and never printed.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import __version__
from ..compose.campaign import Campaign, Summary
from ..compose.dryrun import write_dry_run
from ..compose.sandbox import stop_render_timer
from ..core.config import MAX_CONNECTIONS, load_config, parse_rate
from ..core.errors import ExitCode, MailerError, UsageError
from .output import Reporter, count_data_rows

if TYPE_CHECKING:
    from ..delivery.routes import Route
    from ..store.base import SendStore

__all__ = [
    "ConfigOption",
    "app",
    "bounces",
    "check",
    "handle_errors",
    "init",
    "main",
    "preview",
    "report",
    "send",
    "serve",
    "suppress_add",
    "suppress_app",
    "suppress_import",
    "suppress_list",
    "suppress_remove",
]


app = typer.Typer(
    name="mailer",
    help=(
        "Bulk mail from a CSV and a Jinja template, through your own SMTP relay.\n\n"
        "Examples:\n\n"
        "  mailer init news && cd news\n\n"
        "  mailer send contacts.csv welcome.md.j2 --dry-run | less\n\n"
        "  mailer preview contacts.csv welcome.md.j2 --row 1\n\n"
        "  mailer send contacts.csv welcome.md.j2 --rate 600/min --yes\n\n"
        "  mailer report --campaign welcome"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

_state = {"debug": False}

_DEBUG_HELP = "Show tracebacks and protocol details (never the password)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mailer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help=_DEBUG_HELP)] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Bulk mail from a CSV and a Jinja template, through your own SMTP relay."""
    _state["debug"] = debug


def handle_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one paragraph on stderr and the documented exit code.

    It also gives the command a ``--debug`` option of its own, with the effect of
    ``mailer --debug``: people add flags at the end (``mailer send ... --debug``).
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("debug", False):
            _state["debug"] = True
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C and SIGTERM stop the command through KeyboardInterrupt (below), until
            # a real send installs its own handlers (mailer.send.interrupts).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return function(*args, **kwargs)
        except MailerError as exc:
            if _state["debug"]:
                import traceback

                traceback.print_exc()
                if exc.debug_traceback:  # raised in the delivery process
                    sys.stderr.write("in the delivery process:\n" + exc.debug_traceback)
            Reporter().error(str(exc))
            raise typer.Exit(code=int(exc.exit_code)) from None
        except BrokenPipeError:
            # The reader of our stdout went away (`| head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(code=0) from None
        except KeyboardInterrupt:
            Reporter().error("interrupted.")
            raise typer.Exit(code=int(ExitCode.INTERRUPTED)) from None
        finally:
            stop_render_timer()

    signature = inspect.signature(function, eval_str=True)  # as Typer reads it
    debug = inspect.Parameter(
        "debug",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--debug", help=_DEBUG_HELP)],
    )
    # inspect.signature() (and so Typer) reads __signature__, which typeshed does not
    # declare on the wrapper functools.wraps returns; hence setattr.
    setattr(wrapper, "__signature__", signature.replace(parameters=[*signature.parameters.values(), debug]))  # noqa: B010
    return wrapper


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $MAILER_CONFIG, else ./mailer.toml)."),
]


# --- init ----------------------------------------------------------------------------
@app.command()
@handle_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to write into (created if missing).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that already exist.")] = False,
) -> None:
    """Write a working mailer.toml, contacts.csv and starter template.

    Example: mailer init news && cd news && mailer send contacts.csv welcome.md.j2 --dry-run
    """
    from .starter import write_starter

    written = write_starter(directory, force=force)
    reporter = Reporter()
    for path in written:
        reporter.info(f"wrote {path}")
    import shlex

    prefix = "" if directory.resolve() == Path.cwd().resolve() else f"cd {shlex.quote(str(directory))} && "
    typer.echo(f"Next: {prefix}mailer send contacts.csv welcome.md.j2 --dry-run | less")


# --- send ----------------------------------------------------------------------------
@app.command()
@handle_errors
def send(
    contacts: Annotated[str, typer.Argument(help="Contact CSV (UTF-8), or - for stdin.")],
    template: Annotated[Path, typer.Argument(help="Template: *.txt.j2, *.md.j2 or *.html.j2.")],
    config_path: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build every message and write it to stdout; send nothing.")
    ] = False,
    format: Annotated[str | None, typer.Option("--format", help="Dry-run output: mbox (default) or jsonl.")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Dry run: write one .eml file per message into DIR (new or empty)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --output: delete the .eml files already in DIR first.")
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Handle at most N messages in this run.")] = None,
    where: Annotated[
        str | None,
        typer.Option("--where", help="Segment: a Jinja expression over the columns, e.g. \"country == 'DE'\"."),
    ] = None,
    email_column: Annotated[
        str | None,
        typer.Option("--email-column", help="The column holding the address (default: email / E-mail, any case)."),
    ] = None,
    campaign_name: Annotated[
        str | None, typer.Option("--campaign", help="Send-log key for resuming (default: template name).")
    ] = None,
    rate: Annotated[str | None, typer.Option("--rate", help="Overall rate: N/s, N/min, N/h or N/day.")] = None,
    connections: Annotated[
        int | None, typer.Option("--connections", min=1, max=MAX_CONNECTIONS, help="SMTP connections in the pool.")
    ] = None,
    resend_unknown: Annotated[
        bool,
        typer.Option("--resend-unknown", help="Also resend recipients whose outcome is unknown (status 'sending')."),
    ] = False,
    stream: Annotated[
        str | None,
        typer.Option(
            "--stream",
            help="The [streams.NAME] that carries this campaign (default: the one named like [message] kind).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress; only errors and the summary line.")
    ] = False,
) -> None:
    """Render the template for every selected contact and send it (or --dry-run it).

    Examples:

      mailer send contacts.csv welcome.md.j2 --dry-run | less

      mailer send contacts.csv welcome.md.j2 --dry-run --format jsonl | jq .subject

      mailer send contacts.csv invoice.html.j2 --where "plan == 'pro'" --limit 100 --yes

      mailer send contacts.csv welcome.md.j2 --rate 600/min --connections 4 --yes --json
    """
    config = load_config(config_path)
    overrides: dict[str, Any] = {}
    if rate is not None:
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise UsageError(f"--rate: {exc}.") from None
        overrides["rate"] = rate
    if connections is not None:
        overrides["connections"] = connections
    if overrides:
        config = config.replace_send(**overrides)
    if output is not None and not dry_run:
        raise UsageError("--output is for dry runs only.", hint="Add --dry-run, or drop --output.")
    if format is not None and not dry_run:
        raise UsageError("--format is for dry runs only.", hint="Add --dry-run, or drop --format.")
    if force and output is None:
        raise UsageError("--force goes with --output DIR (it empties that folder's .eml files).")
    if dry_run and json_output and output is None:
        raise UsageError(
            "--json cannot share stdout with the dry-run messages.",
            hint="Add --output DIR to write the messages as files, then --json prints the summary on stdout.",
        )
    from ..delivery.routes import select_route

    route = select_route(config, stream)
    reporter = Reporter(quiet=quiet)
    campaign = Campaign(
        contacts=contacts,
        template=template,
        config=config,
        name=campaign_name,
        where=where,
        limit=limit,
        email_column=email_column,
        spool_stdin=not dry_run,
        return_path=route.return_path,
    )
    try:
        # A dry run signs as the real send does, so a bad key fails it the same way (exit 2).
        signer = _load_signer(campaign)
        if dry_run:
            summary = _dry_run(campaign, reporter, format=format or "mbox", output=output, force=force, signer=signer)
            from ..send.estimate import estimate_send

            summary.estimate = estimate_send(summary.destinations, route=route, config=config)
        else:
            summary = _send(campaign, reporter, yes=yes, resend_unknown=resend_unknown, signer=signer, route=route)
    finally:
        campaign.close()
    if summary.stopped_by is not None:
        if _state["debug"] and summary.debug_traceback:
            sys.stderr.write("in the delivery process:\n" + summary.debug_traceback)
        sent = summary.counts["sent"]
        after = (
            "the outcomes the send log could not take are kept in the local delivery journal, and a re-run "
            "(once the database is back) applies them and resumes."
            if summary.stopped_by_lost_store
            else "every outcome is in the send log (`mailer report`), and a re-run resumes."
        )
        reporter.error(
            f"{summary.stopped_by} The run stopped after {sent} message{'' if sent == 1 else 's'} had been sent; {after}"
        )
    _print_summary(summary, reporter, json_output=json_output)
    raise typer.Exit(code=int(summary.exit_code))


def _load_signer(campaign: Campaign) -> Any:
    """The DKIM signer of ``[dkim]``, or None; a key that cannot be used is a DKIMError."""
    if campaign.config.dkim is None:
        return None
    from ..dkim.signer import DKIMSigner

    return DKIMSigner.load(campaign.config.dkim)


def _send(
    campaign: Campaign, reporter: Reporter, *, yes: bool, resend_unknown: bool, signer: Any, route: Route
) -> Summary:
    from ..send.run import run_send

    confirm = None if yes else _confirmation(reporter)
    return run_send(
        campaign,
        reporter=reporter,
        confirm=confirm,
        resend_unknown=resend_unknown,
        signer=signer,
        debug=_state["debug"],
        route=route,
    )


def _confirmation(reporter: Reporter) -> Callable[[str], bool]:
    """The prompt of a real send without --yes; without a terminal to ask on, a refusal.

    A cron line or a script that forgot --yes must send nothing (PRODUCT.md): its stdin
    is not a terminal, so there is nobody to answer the question.
    """
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(
            "a real send needs confirmation, and there is no terminal to ask on (stdin or stderr is not a "
            "terminal); nothing was sent.",
            hint="Add --yes to send without asking (in cron and scripts), or --dry-run to review first.",
        )
    return functools.partial(_ask, reporter)


def _ask(reporter: Reporter, question: str) -> bool:
    """A yes/no question on the terminal, default no. (Not typer.confirm: it echoes the
    prompt's trailing space to stdout, which must carry only the product, e.g. --json.)"""
    try:
        answer = reporter.console.input(f"{question} [y/N]: ", markup=False, emoji=False)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _dry_run(
    campaign: Campaign, reporter: Reporter, *, format: str, output: Path | None, force: bool, signer: Any
) -> Summary:
    from ..send.signing import Signing
    from ..web.serve import base_url_warning

    summary = Summary(campaign_name=campaign.name, dry_run=True, contacts=campaign.contacts_name)
    out = None if output is not None else sys.stdout.buffer
    if out is not None and reporter.is_terminal and sys.stdout.isatty() and not reporter.quiet:
        reporter.warning("writing the dry run to the terminal; pipe it (| less) or redirect it (> review.mbox).")
    web = campaign.config.web
    plain_http = base_url_warning(web.base_url) if web is not None else None
    if plain_http:
        reporter.warning(plain_http)
    for warning in getattr(signer, "warnings", []) or []:
        reporter.warning(warning)
    # Before the progress display starts its thread: the signing pool forks.
    signing = Signing(signer) if signer is not None else None
    reporter.start_progress(
        "dry run", count_data_rows(campaign.contacts_name if campaign.contacts_name != "<stdin>" else "-")
    )
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if done % 256 == 0:
            reporter.update_progress(summary.counts["rows"], {"rendered": summary.counts["rendered"]})

    try:
        write_dry_run(
            campaign,
            summary,
            out=out,
            output_dir=output,
            format=format,
            force=force,
            on_message=tick,
            sign=signing.signed if signing is not None else None,
        )
    finally:
        reporter.stop_progress()
        if signing is not None:
            signing.close()
    return summary


_SUMMARY_LABELS = (
    ("rows", "rows read"),
    ("rendered", "rendered (dry run)"),
    ("sent", "sent"),
    ("already_done", "already settled in an earlier run"),
    ("failed", "failed (permanent)"),
    ("deferred", "deferred (will retry next run)"),
    ("unknown", "outcome unknown (status sending; see mailer report)"),
    ("bounced_suppressed", "hard bounces added to the suppression list"),
    ("suppressed", "suppressed"),
    ("invalid", "invalid address"),
    ("fields", "wrong number of fields"),
    ("error", "could not be built"),
    ("duplicate", "duplicate address (skipped)"),
    ("blank", "blank rows"),
    ("filtered", "not selected by --where"),
    ("over_limit", "left for later by --limit"),
    ("not_attempted", "not attempted (the run stopped first)"),
)


def _print_summary(summary: Summary, reporter: Reporter, *, json_output: bool) -> None:
    import json

    if json_output:
        typer.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
    problems = [(f"{summary.contacts}:{p.line}", p.reason) for p in summary.problems if p.kind != "blank"]
    listed_kinds = ("invalid", "fields", "duplicate", "error")
    more = max(0, sum(summary.counts[k] for k in listed_kinds) - len(problems))
    title = (
        f"{'dry run' if summary.dry_run else 'send'} of campaign {summary.campaign_name!r} in {summary.elapsed:.1f}s"
    )
    rows: list[tuple[str, Any]] = [(label, summary.counts[key]) for key, label in _SUMMARY_LABELS]
    if summary.estimate is not None and summary.estimate.messages:
        rows.append(("destinations", summary.estimate.describe()))
    if summary.sent_by_relay:
        rows.append(("sent by relay", ", ".join(f"{name} {count}" for name, count in summary.sent_by_relay.items())))
    reporter.print_summary(title, rows, problems, more)


# --- preview -------------------------------------------------------------------------
@app.command()
@handle_errors
def preview(
    contacts: Annotated[str, typer.Argument(help="Contact CSV, or - for stdin.")],
    template: Annotated[Path, typer.Argument(help="Template file.")],
    row: Annotated[
        int | None, typer.Option("--row", min=1, help="The N-th data row (1 = first row after the header).")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="The row with this address.")] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write the HTML part to FILE (open it in a browser).")
    ] = None,
    config_path: ConfigOption = None,
    email_column: Annotated[str | None, typer.Option("--email-column", help="The column holding the address.")] = None,
) -> None:
    """Show one rendered message: headers, text part, attachments.

    Examples:

      mailer preview contacts.csv welcome.md.j2

      mailer preview contacts.csv welcome.md.j2 --to jane@example.com --html /tmp/jane.html
    """
    from .preview import find_message, show_message

    if row is not None and to is not None:
        raise UsageError("give --row or --to, not both.")
    config = load_config(config_path)
    campaign = Campaign(contacts=contacts, template=template, config=config, email_column=email_column)
    try:
        message = find_message(campaign, row=row or (None if to else 1), to=to)
    finally:
        campaign.close()
    if html is not None:
        from .preview import write_html_part

        if not write_html_part(message, html):
            raise UsageError("this message has no HTML part (the template is plain text).")
    show_message(message, html_written_to=html)
    if html is not None:
        Reporter().info(f"wrote the HTML part to {html}")


# --- report --------------------------------------------------------------------------
@app.command()
@handle_errors
def report(
    campaign_name: Annotated[str | None, typer.Option("--campaign", help="Only this campaign (default: all).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    failed: Annotated[
        Path | None,
        typer.Option("--failed", help="Write failed and deferred rows as a CSV that `mailer send` accepts."),
    ] = None,
    html_file: Annotated[
        Path | None,
        typer.Option("--html", help="Also write the report as one self-contained HTML page with charts."),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """What happened, from the send log: counts by status, by domain, by SMTP reply, and
    bounces, complaints (with the rate), unsubscribes, opens and clicks.

    Exit 1 when the complaint rate is above 0.3 % (Gmail's limit); a warning above 0.1 %.

    Examples:

      mailer report --campaign welcome

      mailer report --campaign welcome --failed retry.csv && mailer send retry.csv welcome.md.j2 --campaign welcome-retry

      mailer report --json | jq .by_status

      mailer report --campaign welcome --html welcome.html
    """
    import json

    from ..send.journal import recover_all
    from ..store import open_store

    config = load_config(config_path)
    with open_store(config.log, create=False) as log:
        recover_all(log)  # what a killed run left in its journal (a live run's is left alone)
        if campaign_name is not None:
            known = [entry.name for entry in log.campaigns()]
            if campaign_name not in known:
                listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
                raise UsageError(
                    f"there is no campaign {campaign_name!r} in the send log {config.log.where}.",
                    hint=f"The campaigns there are: {listed}." if known else "It holds no campaign yet.",
                )
        if failed is not None:
            if campaign_name is None:
                raise UsageError("--failed needs --campaign NAME.")
            import io

            from ..send.retry import write_retry_csv

            buffer = io.StringIO()  # the file is written only once every row was found
            written = write_retry_csv(log, campaign_name, buffer)
            try:
                with failed.open("w", newline="", encoding="utf-8") as file:
                    file.write(buffer.getvalue())
            except OSError as exc:
                raise UsageError(f"cannot write the CSV ({exc.strerror}).", path=str(failed)) from None
            Reporter().info(f"wrote {written} failed and deferred rows to {failed}")
        result = log.report(campaign_name)
        from ..report import engagement_of

        engagement = engagement_of(log, campaign_name, sent=result.by_status.get("sent", 0))
    if html_file is not None:
        from ..report import write_report_html

        write_report_html(result, html_file, engagement=engagement)
        Reporter().info(f"wrote the HTML report to {html_file}")
    if json_output:
        import dataclasses

        typer.echo(json.dumps({**result.to_dict(), "engagement": dataclasses.asdict(engagement)}, ensure_ascii=False))
    else:
        from .output import print_report

        print_report(result, engagement=engagement)
    if engagement.complaint_level != "ok":
        rate = f"{engagement.complaint_rate * 100:.2f} %"
        limit = (
            "0.3 %: Gmail's limit; exit 1" if engagement.complaint_level == "fail" else "0.1 %: Gmail's warning line"
        )
        Reporter().warning(
            f"complaint rate {rate} ({engagement.complaints} of {engagement.sent} sent) is above {limit}. "
            "Mail only people who asked for it, make unsubscribing easy, and select recent engagers "
            "(--where on engagement.*)."
        )
    if engagement.complaint_level == "fail":
        raise typer.Exit(code=1)


# --- suppress ------------------------------------------------------------------------
suppress_app = typer.Typer(
    help="The suppression list: addresses never mailed again (unsubscribes, hard bounces, complaints).\n\n"
    "Examples:\n\n  mailer suppress add jane@example.com\n\n  mailer suppress import unsubscribes.csv\n\n"
    "  mailer suppress list > suppressed.txt",
    no_args_is_help=True,
)
app.add_typer(suppress_app, name="suppress")


def _open_log(config_path: Path | None, *, create: bool = True) -> SendStore:
    from ..store import open_store

    return open_store(load_config(config_path).log, create=create)


def _log_exists(config_path: Path | None) -> bool:
    log = load_config(config_path).log
    return log.url is not None or log.path.exists()


@suppress_app.command("add")
@handle_errors
def suppress_add(
    addresses: Annotated[list[str], typer.Argument(help="Addresses to suppress.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (kept with the address).")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Add addresses to the suppression list. Example: mailer suppress add jane@example.com --reason 'asked by phone'"""
    with _open_log(config_path) as log:
        added, present = log.add_suppressions(addresses, reason=reason, source="manual")
    Reporter().console.print(f"added {added}, already present {present}")


@suppress_app.command("remove")
@handle_errors
def suppress_remove(
    addresses: Annotated[list[str], typer.Argument(help="Addresses to take off the list.")],
    config_path: ConfigOption = None,
) -> None:
    """Take addresses off the suppression list. Example: mailer suppress remove jane@example.com"""
    if not _log_exists(config_path):  # nothing to remove from; do not create an empty log
        Reporter().console.print(f"removed 0, not on the list {len(addresses)}")
        return
    with _open_log(config_path) as log:
        removed = log.remove_suppressions(addresses)
    Reporter().console.print(f"removed {removed}, not on the list {len(addresses) - removed}")


@suppress_app.command("list")
@handle_errors
def suppress_list(config_path: ConfigOption = None) -> None:
    """Print the suppression list as CSV (address, reason, source, added_at). Example: mailer suppress list > out.csv"""
    import csv

    writer = csv.writer(sys.stdout)
    writer.writerow(["email", "reason", "source", "added_at"])
    if not _log_exists(config_path):  # an empty list; do not create an empty log
        return
    with _open_log(config_path, create=False) as log:
        for row in log.list_suppressions():
            writer.writerow([row.address, row.reason or "", row.source, row.added_at])


@suppress_app.command("import")
@handle_errors
def suppress_import(
    file: Annotated[Path, typer.Argument(help="A CSV with an email column, or one address per line.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Reason for rows that give none.")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Import addresses from a file. Example: mailer suppress import unsubscribes.csv"""
    with _open_log(config_path) as log:
        result = log.import_suppressions(file, reason=reason)
    reporter = Reporter()
    for entry in result.invalid[:20]:
        reporter.warning(f"{file}:{entry.line}: {entry.value!r} is not a valid address; skipped")
    reporter.console.print(
        f"added {result.added}, already present {result.already_present}, invalid {len(result.invalid)}"
    )


# --- bounces -------------------------------------------------------------------------
@app.command()
@handle_errors
def bounces(
    sources: Annotated[
        list[str], typer.Argument(help="mbox files, Maildir folders, or imaps://user@host/MAILBOX URLs.")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the counts as one JSON object.")] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only messages delivered on or after this day (YYYY-MM-DD, UTC).")
    ] = None,
    mark_seen: Annotated[
        bool, typer.Option("--mark-seen", help="Flag recorded reports as seen (Maildir: move to cur/; IMAP: \\Seen).")
    ] = False,
    move_to: Annotated[
        str | None, typer.Option("--move-to", help="Move recorded reports into this folder (Maildir++ or IMAP).")
    ] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="The variable holding the IMAP password.")
    ] = "MAILER_IMAP_PASSWORD",
    config_path: ConfigOption = None,
) -> None:
    """Read bounce (DSN) and complaint (ARF) reports, record them in the send log, and
    suppress hard bounces, complaints and addresses that soft-bounced in
    [bounces] soft_bounce_limit campaigns in a row. Reading a mailbox again counts nothing twice.

    Examples:

      mailer bounces /var/mail/bounces

      mailer bounces ~/Maildir/.Bounces --mark-seen --json

      mailer bounces imaps://bounces@imap.example.com/INBOX --since 2026-12-01 --move-to Processed
    """
    import json

    from ..bounces.run import process_bounces
    from ..bounces.sources import SourceOptions, open_source
    from ..store import open_store
    from .output import print_bounce_summary

    config = load_config(config_path)
    options = SourceOptions(
        since=_parse_day(since, "--since"),
        mark_seen=mark_seen,
        move_to=move_to,
        password_env=password_env,
        debug=sys.stderr.write if _state["debug"] else None,
    )
    reporter = Reporter()
    opened = []
    try:
        for spec in sources:  # every source is checked before anything is recorded
            opened.append(open_source(spec, options))
        signer = _bounce_signer(config, reporter)
        with open_store(config.log) as log:
            summary = process_bounces(log, opened, signer=signer, soft_bounce_limit=config.bounces.soft_bounce_limit)
    finally:
        for source in opened:
            source.close()
    if summary.broken:
        reporter.warning(f"{summary.broken} message(s) looked like reports but could not be read; they were skipped.")
    if json_output:
        typer.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
    else:
        print_bounce_summary(summary)


def _parse_day(value: str | None, option: str) -> Any:
    if value is None:
        return None
    import datetime

    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {value!r} is not a day.", hint="Write it as YYYY-MM-DD, for example 2026-12-01."
        ) from None


def _bounce_signer(config: Any, reporter: Reporter) -> Any:
    """The [web] key's signer, which checks VERP tokens; None (tokens then name only the
    address, not the campaign) when there is no [web] or its key is unset or invalid."""
    if config.web is None:
        return None
    from ..core.tokens import TokenSigner, WebSecretError

    try:
        return TokenSigner.from_environment(config.web.secret_env, config.web.previous_secret_envs)
    except WebSecretError as error:
        # The error names the variable and what is wrong with it (unset, too short), never the key.
        reporter.warning(
            f"{error.message.removesuffix('.')}: VERP tokens are matched by address only, "
            "the campaign by Message-ID or the latest send."
        )
        return None


# --- check ---------------------------------------------------------------------------
@app.command()
@handle_errors
def serve(
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="HOST:PORT to listen on (default: [web] listen, 127.0.0.1:8025)."),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Run the web endpoint: one-click unsubscribe (RFC 8058) and, with [tracking], opens and clicks.

    Needs [web] in the config and the signing key in $MAILER_WEB_SECRET (or the variable
    [web] secret_env names). Put a TLS reverse proxy in front (see README).

    Example:

      mailer serve --listen 127.0.0.1:8025
    """
    from ..web.serve import serve as run_serve

    reporter = Reporter()
    run_serve(
        load_config(config_path),
        listen=listen,
        warn=reporter.warning,
        ready=lambda host, port: reporter.info(f"listening on http://{host}:{port}"),
    )


@app.command()
@handle_errors
def check(
    contacts: Annotated[str | None, typer.Argument(help="Also check this contact CSV.")] = None,
    config_path: ConfigOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    no_smtp: Annotated[bool, typer.Option("--no-smtp", help="Skip the relay check (no connection).")] = False,
) -> None:
    """Am I ready to send? Config, SMTP relay (no message sent), sender DNS, and the list.

    Exit code 0 when nothing fails, 1 when something does.

    Examples:

      mailer check

      mailer check contacts.csv --json
    """
    import json

    from ..checks.run import run_checks

    reporter = Reporter()
    progress_started = False

    def on_progress(done: int, total: int) -> None:
        nonlocal progress_started
        if not progress_started:
            reporter.start_progress("recipient domains", total)
            progress_started = True
        reporter.update_progress(done, {})

    results = []
    try:
        for item in run_checks(config_path, contacts, on_progress=on_progress, skip_smtp=no_smtp):
            results.append(item)
    finally:
        reporter.stop_progress()
    failed = any(item.status == "fail" for item in results)
    if json_output:
        typer.echo(
            json.dumps({"version": 1, "ok": not failed, "checks": [c.to_dict() for c in results]}, ensure_ascii=False)
        )
    else:
        from .output import print_checks

        print_checks(results)
    raise typer.Exit(code=1 if failed else 0)


def main() -> None:
    """Run the command line (the installed command starts in :mod:`mailer.entry`, which
    handles SIGINT and SIGTERM from the first instant, then runs this app)."""
    from ..entry import main as run

    run()
