"""Terminal output (mailer.cli.output): what a real terminal shows, through a pseudo-terminal.

``mailer send ... --dry-run | less`` is README's first command: stderr is the terminal
that the pager draws on, stdout the pipe into it. Nothing may redraw on that terminal
while the pager owns it; the summary comes once, as one line, at the end.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from cli_fixtures import CONFIG_TEXT
from send_support import Project, addresses

from mailer.cli.output import Reporter

MAILER = [sys.executable, "-c", "from mailer.cli import main; main()"]


def write_project(root: Path, rows: int) -> None:
    (root / "mailer.toml").write_text(CONFIG_TEXT, encoding="utf-8")
    lines = ["email,name"] + [f"user{i}@example.com,User {i}" for i in range(rows)]
    (root / "contacts.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "mail.txt.j2").write_text("Subject: Hello {{ name }}\n\nHi {{ name }}.\n", encoding="utf-8")


def run_with_terminal_stderr(root: Path, *args: str, stdout_to: Path | None = None) -> tuple[int, bytes, bytes]:
    """Run ``mailer ARGS`` with stderr on a pseudo-terminal and stdout a pipe (or a file).

    Returns (exit code, stdout, everything the terminal received)."""
    master, slave = pty.openpty()
    out_file = stdout_to.open("wb") if stdout_to is not None else None
    process = subprocess.Popen(
        [*MAILER, *args],
        stdin=subprocess.DEVNULL,
        stdout=out_file if out_file is not None else subprocess.PIPE,
        stderr=slave,
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "MAILER_CONFIG"},
    )
    os.close(slave)
    shown = b""
    stdout = b""
    try:
        deadline = time.monotonic() + 60
        streams = [master] + ([process.stdout.fileno()] if process.stdout is not None else [])
        while streams and time.monotonic() < deadline:
            ready, _, _ = select.select(streams, [], [], 0.1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the terminal's other side closed
                    chunk = b""
                if not chunk:
                    streams.remove(fd)
                elif fd == master:
                    shown += chunk
                else:
                    stdout += chunk
            if not ready and process.poll() is not None and master not in streams:
                break
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None:
            process.stdout.close()
        if out_file is not None:
            out_file.close()
        os.close(master)
    return process.returncode, stdout, shown


def test_dry_run_into_a_pager_draws_no_progress_and_prints_one_summary_line(tmp_path):
    # As in `mailer send contacts.csv mail.txt.j2 --dry-run | less`.
    write_project(tmp_path, rows=3000)

    code, stdout, shown = run_with_terminal_stderr(tmp_path, "send", "contacts.csv", "mail.txt.j2", "--dry-run")

    assert code == 0, shown
    assert stdout.count(b"\nFrom MAILER-DAEMON ") + stdout.startswith(b"From MAILER-DAEMON ") == 3000
    text = shown.decode("utf-8", "replace")
    assert "━" not in text and "\r" not in text.replace("\r\n", ""), text  # no bar, no redraw
    assert "\x1b[" not in text, text  # no cursor movement or colour on the pager's screen
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dry run of campaign 'mail' in ") and "rendered (dry run) 3000" in lines[0], lines


def test_dry_run_into_a_file_keeps_the_bar_on_the_terminal(tmp_path):
    # `> review.mbox`: nobody else draws on the terminal, so the bar is shown as before.
    write_project(tmp_path, rows=500)

    code, _, shown = run_with_terminal_stderr(
        tmp_path, "send", "contacts.csv", "mail.txt.j2", "--dry-run", stdout_to=tmp_path / "review.mbox"
    )

    assert code == 0, shown
    assert "━" in shown.decode("utf-8", "replace")
    assert (tmp_path / "review.mbox").read_bytes().count(b"From MAILER-DAEMON ") == 500


def test_quiet_into_a_pager_also_prints_only_the_summary_line(tmp_path):
    write_project(tmp_path, rows=10)

    code, _, shown = run_with_terminal_stderr(tmp_path, "send", "contacts.csv", "mail.txt.j2", "--dry-run", "-q")

    assert code == 0, shown
    lines = [line for line in shown.decode().replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) == 1 and "rendered (dry run) 10" in lines[0], lines


def test_the_plain_progress_line_has_no_empty_brackets():
    stderr = io.StringIO()
    now = [0.0]
    reporter = Reporter(stderr=stderr, clock=lambda: now[0])
    reporter.start_progress("recipient domains", 10)
    now[0] = 11.0
    reporter.update_progress(0, {})
    now[0] = 22.0
    reporter.update_progress(4, {"sent": 3, "failed": 0, "deferred": 1})
    reporter.stop_progress()

    assert stderr.getvalue().splitlines() == [
        "recipient domains: 0 done, 0/s",
        "recipient domains: 4 done (sent 3, deferred 1), 0/s",
    ]


def test_a_real_send_into_a_pipe_draws_no_progress_and_prints_one_summary_line(smtp_server, tmp_path):
    # As in `mailer send contacts.csv news.txt.j2 --yes --json | less` typed at a terminal.
    project = Project(tmp_path, smtp_server)
    project.write_contacts(addresses(20))

    code, stdout, shown = run_with_terminal_stderr(
        tmp_path,
        "send",
        str(project.contacts_path),
        str(project.template_path),
        "--yes",
        "--json",
        "--config",
        str(project.config_path),
    )

    assert code == 0, shown
    assert json.loads(stdout)["counts"]["sent"] == 20
    text = shown.decode("utf-8", "replace")
    assert "━" not in text and "\x1b[" not in text, text
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("send of campaign 'news'") and "sent 20" in lines[0], lines
