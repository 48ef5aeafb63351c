"""Fixtures for the dry-run tests: a project folder with real files, and the real CLI.

``project`` is a temporary folder (also the working directory, so that ``./mailer.toml``
lookups see only what a test wrote) with writers for contacts, templates, config and
attachments. ``run_cli`` invokes the Typer app in-process with ``CliRunner``; stdout and
stderr are kept apart, so a test can check that stdout holds only the product.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import mailbox
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from mailer.cli.app import app

CONFIG_TEXT = """\
[smtp]
host = "127.0.0.1"
port = 2525
security = "none"

[message]
from = "Acme News <news@acme.example>"
"""


class Project:
    """A folder holding one mailer project; every writer returns the path it wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
        return path

    def csv(self, content: str | bytes, name: str = "contacts.csv") -> Path:
        return self.write(name, content)

    def template(self, content: str, name: str = "mail.txt.j2") -> Path:
        return self.write(name, content)

    def config(self, content: str = CONFIG_TEXT, name: str = "mailer.toml") -> Path:
        return self.write(name, content)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MAILER_CONFIG", raising=False)
    monkeypatch.delenv("MAILER_SMTP_PASSWORD", raising=False)
    return Project(folder)


@pytest.fixture
def run_cli() -> Callable[..., Result]:
    """``run_cli("send", ..., input=b"...")`` -> ``typer.testing.Result``."""
    runner = CliRunner()

    def run(*args: str, input: str | bytes | None = None) -> Result:
        result = runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=True)
        return result

    return run


def assert_no_traceback(result: Result) -> None:
    """Neither stream shows a traceback, and no exception escaped the CLI."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def assert_fails(result: Result, code: int, *fragments: str) -> None:
    """Exit ``code``, each fragment on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout[:2000])
    assert_no_traceback(result)
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def parse_mbox(data: bytes, folder: Path) -> list[EmailMessage]:
    """Write ``data`` to a file and read it back with ``mailbox.mbox``."""
    path = folder / "out.mbox"
    path.write_bytes(data)
    box = mailbox.mbox(str(path), factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default))
    try:
        return [box[key] for key in box.keys()]  # noqa: SIM118 - iterating a mailbox yields messages
    finally:
        box.close()


def parse_message(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def all_defects(message: EmailMessage) -> list:
    return [defect for part in message.walk() for defect in part.defects]


_runs = itertools.count()


def dry_run(
    project: Project, run_cli, *args: str, contacts: str = "contacts.csv", template: str = "mail.txt.j2", input=None
):
    """A dry run into a fresh ``--output`` folder with ``--json``: (result, summary, messages in order).

    With ``--output``, stdout holds only the JSON summary.
    """
    out = project.path(f"out{next(_runs)}")
    result = run_cli("send", contacts, template, "--dry-run", "--output", out, "--json", *args, input=input)
    assert_no_traceback(result)
    summary = json.loads(result.stdout) if result.stdout.strip() else None
    messages = [parse_message(path.read_bytes()) for path in sorted(out.glob("*.eml"))] if out.exists() else []
    return result, summary, messages
