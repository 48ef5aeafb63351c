"""The ``mailer`` command's entry point: signals are ours before the heavy imports start.

Importing the CLI (Typer, rich, Jinja, the MIME and DKIM libraries) takes a good part
of a second on a slow machine. A Ctrl-C in that time used to end in a
KeyboardInterrupt traceback, and a SIGTERM (cron's timeout, a service manager) in
exit 143, which the exit-code table does not know. Nothing can have been sent that
early, so both end the run quietly with exit 130 ("interrupted"); until a real send
installs its own handlers (:mod:`mailer.send.interrupts`), SIGTERM means what Ctrl-C
means (:func:`mailer.cli.app.handle_errors` sets that up when a command starts).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

__all__ = ["main"]

_INTERRUPTED = 130  # mailer.core.errors.ExitCode.INTERRUPTED, not imported: that is the point


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"mailer: interrupted.\n")
    os._exit(_INTERRUPTED)


def main() -> None:
    """Run the command line, with SIGINT and SIGTERM handled from the first instant."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _interrupted_while_starting)
    from .cli.app import app

    # Typer builds the commands and parses the arguments with these handlers still set;
    # the command itself (cli.app.handle_errors) makes both raise KeyboardInterrupt,
    # which it turns into exit 130 after writing what the run did.
    app()
