"""The command line: parse options, call one library function, render its result.

Errors become exit codes in one place (:func:`handle_errors`): a :class:`MailerError`
is printed as one paragraph on stderr and exits with its code; a traceback is shown
only with ``--debug``. The SMTP password is never an argument and never printed.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from . import __version__
from .campaign import Campaign, Summary, write_dry_run
from .config import Config, load_config, parse_rate
from .errors import ExitCode, MailerError, UsageError
from .reporting import Reporter, count_data_rows

__all__ = ["app", "main"]

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mailer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and protocol details (never the password).")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Bulk mail from a CSV and a Jinja template, through your own SMTP relay."""
    _state["debug"] = debug


def handle_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one paragraph on stderr and the documented exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except MailerError as exc:
            if _state["debug"]:
                import traceback

                traceback.print_exc()
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

    return wrapper


ConfigOption = Annotated[
    Optional[Path],
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
    prefix = "" if directory.resolve() == Path.cwd().resolve() else f"cd {directory} && "
    typer.echo(f"Next: {prefix}mailer send contacts.csv welcome.md.j2 --dry-run | less")


# --- send ----------------------------------------------------------------------------
@app.command()
@handle_errors
def send(
    contacts: Annotated[str, typer.Argument(help="Contact CSV (UTF-8), or - for stdin.")],
    template: Annotated[Path, typer.Argument(help="Template: *.txt.j2, *.md.j2 or *.html.j2.")],
    config_path: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build every message and write it to stdout; send nothing.")] = False,
    format: Annotated[str, typer.Option("--format", help="Dry-run output: mbox or jsonl.")] = "mbox",
    output: Annotated[Optional[Path], typer.Option("--output", help="Dry run: write one .eml file per message into DIR.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="Handle at most N messages in this run.")] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="Segment: a Jinja expression over the columns, e.g. \"country == 'DE'\".")] = None,
    email_column: Annotated[Optional[str], typer.Option("--email-column", help="The column holding the address (default: email / E-mail, any case).")] = None,
    campaign: Annotated[Optional[str], typer.Option("--campaign", help="Send-log key for resuming (default: template name).")] = None,
    rate: Annotated[Optional[str], typer.Option("--rate", help="Overall rate: N/s, N/min, N/h or N/day.")] = None,
    connections: Annotated[Optional[int], typer.Option("--connections", min=1, help="SMTP connections in the pool.")] = None,
    resend_unknown: Annotated[bool, typer.Option("--resend-unknown", help="Also resend recipients whose outcome is unknown (status 'sending').")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress; only errors and the summary line.")] = False,
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
    reporter = Reporter(quiet=quiet)
    job = Campaign(contacts=contacts, template=template, config=config, name=campaign, where=where, limit=limit, email_column=email_column)
    try:
        if dry_run:
            summary = _dry_run(job, reporter, format=format, output=output)
        else:
            from .sending import run_send

            summary = run_send(job, reporter=reporter, assume_yes=yes, resend_unknown=resend_unknown, debug=_state["debug"])
    finally:
        job.close()
    _print_summary(summary, reporter, json_output=json_output)
    raise typer.Exit(code=int(summary.exit_code))


def _dry_run(job: Campaign, reporter: Reporter, *, format: str, output: Optional[Path]) -> Summary:
    summary = Summary(campaign=job.name, dry_run=True, contacts=job.contacts_name)
    out = None if output is not None else sys.stdout.buffer
    if out is not None and reporter.is_terminal and sys.stdout.isatty() and not reporter.quiet:
        reporter.warning("writing the dry run to the terminal; pipe it (| less) or redirect it (> review.mbox).")
    reporter.start_progress("dry run", count_data_rows(job.contacts_name if job.contacts_name != "<stdin>" else "-"))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if done % 256 == 0:
            reporter.update_progress(summary.counts["rows"], {"rendered": summary.counts["rendered"]})

    try:
        write_dry_run(job, summary, out=out, output_dir=output, format=format, on_message=tick)
    finally:
        reporter.stop_progress()
    return summary


_SUMMARY_LABELS = (
    ("rows", "rows read"),
    ("rendered", "rendered (dry run)"),
    ("sent", "sent"),
    ("already_done", "already settled in an earlier run"),
    ("failed", "failed (permanent)"),
    ("deferred", "deferred (will retry next run)"),
    ("unknown", "outcome unknown (status sending)"),
    ("suppressed", "suppressed"),
    ("invalid", "invalid address"),
    ("fields", "wrong number of fields"),
    ("error", "could not be built"),
    ("duplicate", "duplicate address (skipped)"),
    ("blank", "blank rows"),
    ("filtered", "not selected by --where"),
    ("over_limit", "left for later by --limit"),
    ("not_attempted", "not attempted (interrupted)"),
)


def _print_summary(summary: Summary, reporter: Reporter, *, json_output: bool) -> None:
    import json

    if json_output:
        typer.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
    problems = [(f"{summary.contacts}:{p.line}", p.reason) for p in summary.problems if p.kind != "blank"]
    listed_kinds = ("invalid", "fields", "duplicate", "error")
    more = max(0, sum(summary.counts[k] for k in listed_kinds) - len(problems))
    title = f"{'dry run' if summary.dry_run else 'send'} of campaign {summary.campaign!r} in {summary.elapsed:.1f}s"
    rows = [(label, summary.counts[key]) for key, label in _SUMMARY_LABELS]
    reporter.print_summary(title, rows, problems, more)


# --- preview -------------------------------------------------------------------------
@app.command()
@handle_errors
def preview(
    contacts: Annotated[str, typer.Argument(help="Contact CSV, or - for stdin.")],
    template: Annotated[Path, typer.Argument(help="Template file.")],
    row: Annotated[Optional[int], typer.Option("--row", min=1, help="The N-th data row (1 = first row after the header).")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="The row with this address.")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write the HTML part to FILE (open it in a browser).")] = None,
    config_path: ConfigOption = None,
    email_column: Annotated[Optional[str], typer.Option("--email-column", help="The column holding the address.")] = None,
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
    job = Campaign(contacts=contacts, template=template, config=config, email_column=email_column)
    try:
        message = find_message(job, row=row or (None if to else 1), to=to)
    finally:
        job.close()
    show_message(message)
    if html is not None:
        from .preview import write_html_part

        if not write_html_part(message, html):
            raise UsageError("this message has no HTML part (the template is plain text).")
        Reporter().info(f"wrote the HTML part to {html}")


def main() -> None:
    """Entry point of the ``mailer`` command."""
    app()
