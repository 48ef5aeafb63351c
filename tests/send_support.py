"""Helpers for the end-to-end tests of the CLI (send, report, suppress, check).

A :class:`Project` is a folder in ``tmp_path`` with a real ``mailer.toml`` (its
``[smtp]`` pointing at a loopback test server), a contacts CSV and a template. Commands
run either in-process through Typer's ``CliRunner`` (:meth:`Project.cli`) or as a real
process (:meth:`Project.run` / :meth:`Project.spawn`), for the tests that need signals,
a second process or the real stdout and stderr.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from store_support import delivery_row
from typer.testing import CliRunner

from mailer.cli.app import app
from mailer.store.sqlite import SendLog

__all__ = ["MAILER", "Outcome", "Project", "addresses", "received_addresses", "wait_for"]

#: The mailer command as a real process (the package has no __main__).
MAILER = [sys.executable, "-m", "mailer"]


@dataclass(repr=False)
class Outcome:
    """What one command did: exit code, stdout and stderr (text)."""

    exit_code: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:  # shown by pytest when an assertion on it fails
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def addresses(count: int, *, domain: str = "example.com", prefix: str = "user") -> list[str]:
    return [f"{prefix}{index:03d}@{domain}" for index in range(count)]


def received_addresses(server) -> list[str]:
    """Every recipient of every accepted transaction, in order (duplicates kept)."""
    with server.lock:
        return [address for message in server.messages for address in message.rcpt_tos]


def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; return its value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class Project:
    """A mailer project folder: config, contacts, template, send log."""

    def __init__(self, root: Path, server=None, **sections: dict[str, Any]) -> None:
        self.root = root
        self.server = server
        self.config_path = root / "mailer.toml"
        self.log_path = root / "mailer.sqlite3"
        self.contacts_path = root / "contacts.csv"
        self.template_path = root / "news.txt.j2"
        self.sections: dict[str, dict[str, Any]] = {}
        self.configure(**sections)
        self.write_template("Subject: News for {{ name }}\n\nHello {{ name }},\nthis is the news.\n")

    # -- files --------------------------------------------------------------------
    def configure(self, **sections: dict[str, Any] | None) -> Path:
        """(Re)write mailer.toml: defaults for a fast loopback send, updated by ``sections``
        (a section given as None is removed)."""
        config: dict[str, dict[str, Any]] = {
            "smtp": {
                "host": "127.0.0.1",
                "port": self.server.port if self.server else 2525,
                "security": "none",
                "timeout": 5,
            },
            "send": {"rate": "unlimited", "connections": 2, "retries": 2, "retry_backoff": 0.01},
            "message": {"from": "Acme News <news@acme.example>", "kind": "transactional"},
            "log": {"path": self.log_path.name},
            # Never the system resolver: a closed loopback port unless a test sets its DNS server.
            "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": 0.5},
        }
        for name, values in {**self.sections, **sections}.items():
            if values is None:
                config.pop(name, None)
            else:
                config.setdefault(name, {}).update(values)
        self.sections = {**self.sections, **sections}
        self.config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
        return self.config_path

    def write_contacts(self, emails: Iterable[str], *, name: str = "contacts.csv") -> Path:
        """A contacts CSV with columns email,name (name: the local part)."""
        path = self.root / name
        lines = ["email,name"] + [f"{email},{email.split('@')[0]}" for email in emails]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if name == "contacts.csv":
            self.contacts_path = path
        return path

    def write_template(self, text: str, *, name: str = "news.txt.j2") -> Path:
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        self.template_path = path
        return path

    # -- running ------------------------------------------------------------------
    def cli(self, *args: str, env: dict[str, str | None] | None = None, input: str | None = None) -> Outcome:
        """Run ``mailer ARGS`` in this process (CliRunner); ``--config`` is added for you."""
        environment = {"MAILER_CONFIG": None, **(env or {})}
        result = CliRunner().invoke(app, [*args, "--config", str(self.config_path)], env=environment, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)

    def send(self, *args: str, contacts: Path | None = None, template: Path | None = None, **kwargs) -> Outcome:
        """``mailer send CONTACTS TEMPLATE ARGS`` in this process."""
        return self.cli(
            "send", str(contacts or self.contacts_path), str(template or self.template_path), *args, **kwargs
        )

    def _command(self, args: tuple[str, ...]) -> list[str]:
        return [*MAILER, *args, "--config", str(self.config_path)]

    def _environment(self, env: dict[str, str] | None) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if k != "MAILER_CONFIG"}
        environment.update(env or {})
        return environment

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Outcome:
        """Run ``mailer ARGS`` as a real process and wait for it."""
        done = subprocess.run(
            self._command(args),
            cwd=self.root,
            env=self._environment(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Outcome(done.returncode, done.stdout, done.stderr)

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``mailer ARGS`` as a real process (stdout and stderr piped, stdin empty)."""
        return subprocess.Popen(
            self._command(args),
            cwd=self.root,
            env=self._environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def spawn_send(self, *args: str, **kwargs) -> subprocess.Popen:
        return self.spawn("send", str(self.contacts_path), str(self.template_path), *args, **kwargs)

    # -- the send log ---------------------------------------------------------------
    def statuses(self, campaign: str = "news") -> dict[str, str]:
        """recipient -> status for one campaign, read through the library."""
        with SendLog.open(self.log_path, create=False) as log:
            with log._guard as conn:  # a read-only peek; SendLog has no "all rows" query
                rows = conn.execute(
                    "SELECT recipient, status FROM deliveries WHERE campaign = ?", (campaign,)
                ).fetchall()
        return {recipient: status for recipient, status in rows}

    def delivery(self, recipient: str, campaign: str = "news"):
        return delivery_row(self.log_path, campaign, recipient)

    def peek_statuses(self, campaign: str = "news") -> dict[str, str]:
        """Like :meth:`statuses`, for polling while another process writes (never creates the file)."""
        if not self.log_path.exists():
            return {}
        try:
            conn = sqlite3.connect(f"file:{self.log_path}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute(
                    "SELECT recipient, status FROM deliveries WHERE campaign = ?", (campaign,)
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return {}
        return dict(rows)

    def report(self, *args: str) -> dict[str, Any]:
        """``mailer report --json ARGS``, parsed."""
        outcome = self.cli("report", "--json", *args)
        assert outcome.exit_code == 0, outcome
        return json.loads(outcome.stdout)

    def log_bytes(self) -> bytes:
        """The send log database and its WAL and shared-memory files, as bytes."""
        return b"".join(
            path.read_bytes() for path in (self.log_path, self.root / (self.log_path.name + "-wal")) if path.exists()
        )
