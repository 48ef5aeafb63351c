"""``--debug`` is accepted before the command (``mailer --debug send``) and after it
(``mailer send ... --debug``), on every command, with the same effect."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from mailer.cli.app import app

MISSING_CONFIG = "/nonexistent/mailer.toml"


def _commands() -> dict[str, object]:
    group = typer.main.get_command(app)
    commands = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub, inner in command.commands.items():
                commands[f"{name} {sub}"] = inner
        else:
            commands[name] = command
    return commands


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"MAILER_CONFIG": None})


def test_every_command_has_its_own_debug_option():
    commands = _commands()
    assert len(commands) >= 9
    for name, command in commands.items():
        options = [option for parameter in command.params for option in parameter.opts]
        assert "--debug" in options, f"`mailer {name}` does not accept --debug"


# Each command with arguments that make it fail on the missing config file.
FAILING = [
    ("send", "contacts.csv", "mail.txt.j2", "--config", MISSING_CONFIG),
    ("preview", "contacts.csv", "mail.txt.j2", "--config", MISSING_CONFIG),
    ("report", "--config", MISSING_CONFIG),
    ("suppress", "add", "jane@example.org", "--config", MISSING_CONFIG),
    ("suppress", "remove", "jane@example.org", "--config", MISSING_CONFIG),
    ("suppress", "list", "--config", MISSING_CONFIG),
    ("suppress", "import", "unsubscribes.csv", "--config", MISSING_CONFIG),
]


@pytest.mark.parametrize("args", FAILING, ids=lambda args: " ".join(a for a in args if not a.startswith("/")))
def test_debug_after_the_command_shows_the_traceback_as_before_it(args):
    plain = invoke(*args)
    before = invoke("--debug", *args)
    after = invoke(*args, "--debug")

    assert plain.exit_code == before.exit_code == after.exit_code == 2, (plain.stderr, after.stderr)
    assert "config file not found" in after.stderr
    assert "Traceback" not in plain.stderr
    assert "Traceback" in before.stderr and "Traceback" in after.stderr
    assert "ConfigError" in after.stderr


def test_debug_after_init_and_check_is_accepted(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    init = invoke("init", str(taken), "--debug")
    assert init.exit_code == 2 and "Traceback" in init.stderr, init.stderr
    check = invoke("check", "--no-smtp", "--config", MISSING_CONFIG, "--debug")
    assert check.exit_code == 1 and "No such option" not in check.stderr, check.stderr
