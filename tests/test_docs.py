"""README stays true: every command and `send` option is documented, and the two
opening commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

import typer.main

from mailer.cli.app import app

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> dict[str, object]:
    group = typer.main.get_command(app)
    names = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub in command.commands:
                names[f"{name} {sub}"] = command.commands[sub]
        else:
            names[name] = command
    return names


def test_every_command_is_in_the_readme_and_has_help():
    commands = _commands()
    assert {"init", "send", "preview", "check", "report", "suppress add", "suppress import"} <= set(commands)
    for name, command in commands.items():
        first = name.split()[0]
        assert f"mailer {first}" in README, f"README does not mention `mailer {first}`"
        assert command.help and command.help.strip(), f"`mailer {name}` has no help text"


def test_every_send_option_is_in_the_readme():
    send = _commands()["send"]
    for parameter in send.params:
        for option in parameter.opts:
            if option.startswith("--") and option != "--help":
                assert option in README, f"README does not document `mailer send {option}`"


def test_ci_runs_the_readme_commands():
    fenced = re.findall(r"```sh\n(.*?)\n```", README, re.DOTALL)
    install, tests = fenced[0].strip(), fenced[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert install.split(" | ")[0] in ci
    assert tests in ci
