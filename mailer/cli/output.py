"""Everything mailer shows on the terminal: progress, summaries, tables, errors.

Only the modules of :mod:`mailer.cli` import rich. The engine reports through
callbacks; the functions here turn those reports into a progress bar on a terminal,
or a plain line every ten seconds otherwise (so cron mail stays short).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..core.addresses import display_domain

__all__ = ["PLAIN_PROGRESS_INTERVAL", "Reporter", "count_data_rows", "print_checks", "print_report"]


PLAIN_PROGRESS_INTERVAL = 10.0


def count_data_rows(path: str) -> int | None:
    """Count a file's lines quickly (for the progress bar's total); None for stdin."""
    if path == "-":
        return None
    try:
        with open(path, "rb") as file:
            lines = 0
            last = b"\n"
            while chunk := file.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
            if last != b"\n":
                lines += 1
        return max(lines - 1, 0)
    except OSError:
        return None


def _is_pipe(stream: IO[Any] | None) -> bool:
    """Whether ``stream`` is a pipe or socket (whose reader may be a pager on our terminal)."""
    if stream is None:  # no stdout at all (sys.stdout can be None)
        return False
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class Reporter:
    """Progress and messages on stderr; ``quiet`` leaves only errors and the summary line.

    Live progress (the bar, or the plain line every ten seconds) is shown unless stdout
    is a pipe while stderr is a terminal: in ``mailer send ... --dry-run | less`` the
    pager owns that terminal, and every redraw would land on its screen. Then only the
    summary is printed, as one line, at the end.
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        stderr: IO[str] | None = None,
        stdout: IO[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = Console(file=stderr or sys.stderr, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.is_terminal = self.console.is_terminal
        # A terminal shared with whatever reads our stdout (less, more, fzf...).
        self.shares_terminal = self.is_terminal and _is_pipe(sys.stdout if stdout is None else stdout)
        self.shows_bar = self.is_terminal and not self.quiet and not self.shares_terminal
        self._clock = clock
        self._progress: Progress | None = None
        self._task: TaskID | None = None  # the bar's task, set with _progress
        self._last_plain = 0.0
        self._started = clock()
        self._label = ""

    # -- messages -----------------------------------------------------------------
    def error(self, text: str) -> None:
        self.console.print(f"[bold red]error:[/] {escape(text)}")

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(text)}")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(escape(text))

    # -- progress -----------------------------------------------------------------
    def start_progress(self, label: str, total: int | None) -> None:
        self._label = label
        self._started = self._clock()
        self._last_plain = self._started
        if self.quiet or self.shares_terminal:
            return
        if self.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task(label, total=total, counts="", rate="")
            self._progress.start()

    def update_progress(self, done: int, counts: dict[str, int]) -> None:
        """Called often; cheap unless a refresh is due."""
        if self.quiet or self.shares_terminal:
            return
        now = self._clock()
        elapsed = max(now - self._started, 1e-9)
        if self._progress is not None and self._task is not None:
            text = " ".join(f"{k} {v}" for k, v in counts.items() if v)
            self._progress.update(self._task, completed=done, counts=text, rate=f"{done / elapsed:,.0f}/s")
        elif now - self._last_plain >= PLAIN_PROGRESS_INTERVAL:
            self._last_plain = now
            text = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            detail = f" ({text})" if text else ""
            self.console.print(f"{self._label}: {done} done{detail}, {done / elapsed:,.0f}/s")

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- tables -------------------------------------------------------------------
    def print_summary(
        self, title: str, rows: Iterable[tuple[str, Any]], problems: list[tuple[str, str]], more: int
    ) -> None:
        """A summary table (counts) and the first problems, each with its file and line."""
        rows = [(k, v) for k, v in rows if v]
        if problems:
            for where, reason in problems:
                self.console.print(f"[yellow]skipped[/] {escape(where)}: {escape(reason)}")
            if more:
                self.console.print(f"… and {more} more problems (see `mailer report` or --json).")
        if not self.shows_bar:
            self.console.print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in rows))
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what")
        table.add_column("count", justify="right")
        for key, value in rows:
            table.add_row(key, str(value))
        self.console.print(table)


_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def print_checks(checks: list[Any], *, console: Console | None = None) -> None:
    """`mailer check` as a table on stdout (a terminal), or one line per check otherwise."""
    console = console or Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        for item in checks:
            console.print(f"{item.status.upper():4} {item.section}/{item.name}: {escape(item.detail)}")
            if item.fix and item.status != "ok":
                console.print(f"     fix: {escape(item.fix)}")
        return
    table = Table(show_lines=False)
    table.add_column("check")
    table.add_column("", no_wrap=True)
    table.add_column("detail / what to do")
    for item in checks:
        style = _STATUS_STYLE.get(item.status, "")
        detail = escape(item.detail)
        if item.fix and item.status != "ok":
            detail += f"\n[dim]→ {escape(item.fix)}[/]"
        table.add_row(f"{item.section} · {escape(item.name)}", f"[{style}]{item.status}[/]", detail)
    console.print(table)


def print_report(report: Any, *, engagement: Any = None, console: Console | None = None) -> None:
    """`mailer report` as tables on stdout."""
    console = console or Console(highlight=False, soft_wrap=True)
    if engagement is not None:
        _print_engagement(engagement, console)
    title = f"campaign {report.campaign}" if report.campaign else "all campaigns"
    status = Table(title=f"{title}: {report.total} recipients", title_justify="left")
    status.add_column("status")
    status.add_column("recipients", justify="right")
    for name, count in report.by_status.items():
        status.add_row(name, str(count))
    console.print(status)
    if report.by_domain:
        domains = Table(title="by recipient domain", title_justify="left")
        domains.add_column("domain")
        domains.add_column("total", justify="right")
        domains.add_column("by status")
        for row in report.by_domain[:25]:
            domains.add_row(
                escape(display_domain(row.domain)),
                str(row.total),
                ", ".join(f"{k} {v}" for k, v in row.by_status.items()),
            )
        console.print(domains)
    if report.by_smtp_code:
        codes = Table(title="by SMTP reply (or reason, without one)", title_justify="left")
        codes.add_column("code")
        codes.add_column("count", justify="right")
        codes.add_column("example reply / reason")
        for row in report.by_smtp_code:
            code = "-" if row.code is None else str(row.code)
            codes.add_row(code, str(row.count), escape(row.example_reply or ""))
        console.print(codes)
    if report.unknown_outcome:
        console.print(
            f"[yellow]{len(report.unknown_outcome)} recipients have an unknown outcome[/] (status sending: "
            "the process stopped during their SMTP transaction). They are not resent unless you pass "
            "--resend-unknown:"
        )
        for row in report.unknown_outcome[:50]:
            console.print(f"  {escape(row.recipient)} ({escape(row.message_id or '')})")


def _print_engagement(engagement: Any, console: Console) -> None:
    """Bounces, complaints, unsubscribes, opens and clicks (before the delivery tables)."""
    table = Table(title="after sending (recipients)", title_justify="left")
    table.add_column("event")
    table.add_column("recipients", justify="right")
    table.add_column("rate of sent", justify="right")
    sent = engagement.sent

    def rate(count: int) -> str:
        return f"{count / sent * 100:.2f} %" if sent else "-"

    level = {"ok": "", "warn": " [yellow](warn: above 0.1 %)[/]", "fail": " [red](fail: above 0.3 %)[/]"}
    rows = [
        ("hard bounces", engagement.bounces_hard, ""),
        ("soft bounces", engagement.bounces_soft, ""),
        ("complaints", engagement.complaints, level[engagement.complaint_level]),
        ("unsubscribes", engagement.unsubscribes, ""),
        ("unique opens*", engagement.unique_opens, ""),
        ("unique clicks", engagement.unique_clicks, ""),
    ]
    for name, count, note in rows:
        table.add_row(name, str(count), rate(count) + note)
    console.print(table)
    console.print("* opens are inflated: Apple Mail Privacy Protection loads the pixel of every message on arrival.")
    if engagement.clicks_by_link:
        links = Table(title="click-through per link", title_justify="left")
        links.add_column("link")
        links.add_column("recipients", justify="right")
        links.add_column("clicks", justify="right")
        links.add_column("click-through", justify="right")
        for link in engagement.clicks_by_link[:25]:
            links.add_row(
                escape(link.url), str(link.unique_clicks), str(link.clicks), f"{link.click_through * 100:.2f} %"
            )
        console.print(links)


_BOUNCE_ROWS = (
    ("read", "messages read"),
    ("reports", "bounce and complaint reports"),
    ("hard", "hard bounces (suppressed)"),
    ("soft", "soft bounces"),
    ("policy", "policy rejections (not suppressed)"),
    ("complaints", "complaints (suppressed)"),
    ("suppressed", "addresses suppressed"),
    ("soft_streaks", "  of them for soft bounces in a row"),
    ("duplicates", "already recorded (read before)"),
    ("unattributed", "matched to no send"),
    ("foreign", "not reports (left alone)"),
    ("broken", "unreadable reports (skipped)"),
)


def print_bounce_summary(summary: Any, *, console: Console | None = None) -> None:
    """`mailer bounces`: a table on stdout on a terminal, else one ``count name`` line each."""
    console = console or Console(highlight=False, soft_wrap=True)
    values = summary.to_dict()
    if not console.is_terminal:
        for key, _label in _BOUNCE_ROWS:
            console.print(f"{key} {values[key]}")
        return
    table = Table(show_lines=False, title="mailer bounces")
    table.add_column("", justify="right")
    table.add_column("")
    for key, label in _BOUNCE_ROWS:
        table.add_row(str(values[key]), label)
    console.print(table)
