"""`mailer preview`: find one contact's message and show it on the terminal."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from ..compose.campaign import Campaign, Summary
from ..compose.message import BuiltMessage
from ..core.errors import UsageError

__all__ = ["find_message", "show_message", "write_html_part"]


def find_message(campaign: Campaign, *, row: int | None, to: str | None) -> BuiltMessage:
    """The message of the ``row``-th data row, or of the contact with address ``to``."""
    summary = Summary(campaign_name=campaign.name, dry_run=True, contacts=campaign.contacts_name)
    wanted = to.strip().lower() if to else None
    for contact, message in campaign.messages(summary):
        if row is not None and summary.counts["rows"] == row:
            return message
        if wanted is not None and contact.email.lower() == wanted:
            return message
        if row is not None and summary.counts["rows"] > row:
            break
    for problem in summary.problems:
        if (row is not None and problem.line >= row + 1 and summary.counts["rows"] >= row) or (
            wanted and problem.email.lower() == wanted
        ):
            raise UsageError(f"{campaign.contacts_name}:{problem.line}: that row is not mailed: {problem.reason}.")
    what = f"row {row}" if row is not None else f"a contact with address {to}"
    raise UsageError(f"{campaign.contacts_name} has no {what}.")


def show_message(message: BuiltMessage, *, console: Console | None = None, html_written_to: Path | None = None) -> None:
    """Print headers, the text part and the attachment list.

    On a terminal: panels, with long values (List-Unsubscribe URLs) wrapped, never
    cut. Piped or redirected: plain ``Name: value`` lines, so that every value can be
    copied or grepped whole. ``html_written_to``: where ``--html`` wrote the HTML part.
    """
    console = console or Console(highlight=False)
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    text = parsed.get_body(preferencelist=("plain",))
    html = parsed.get_body(preferencelist=("html",))
    if console.is_terminal:
        table = Table(show_header=False, box=None, padding=(0, 1))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in parsed.items():
            table.add_row(f"{name}:", escape(str(value)))
        console.print(Panel(table, title="headers", title_align="left"))
        if text is not None:
            console.print(Panel(escape(text.get_content()), title="text part", title_align="left"))
    else:
        for name, value in parsed.items():
            console.print(f"{name}: {escape(str(value))}", soft_wrap=True)
        if text is not None:
            console.print()
            console.print(escape(text.get_content().rstrip("\n")), soft_wrap=True)
            console.print()
    if html is not None:
        where = f"written to {html_written_to}" if html_written_to is not None else "write it out with --html FILE"
        console.print(f"[dim]HTML part: {len(html.get_content()):,} characters ({escape(where)})[/]")
    attachments = [(part.get_filename(), len(part.get_content())) for part in parsed.iter_attachments()]
    for filename, size in attachments:
        console.print(f"attachment: {escape(filename or '?')} ({size:,} bytes)")
    console.print(
        f"[dim]{len(message.data):,} bytes; envelope {escape(message.sender)} -> {escape(', '.join(message.recipients))}[/]",
        soft_wrap=True,
    )


def write_html_part(message: BuiltMessage, path: Path) -> bool:
    """Write the HTML part to ``path``; False when the message has none."""
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    html = parsed.get_body(preferencelist=("html",))
    if html is None:
        return False
    try:
        path.write_text(html.get_content(), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the HTML part ({exc.strerror}).", path=str(path)) from None
    return True
