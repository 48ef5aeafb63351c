"""Ctrl-C and SIGTERM during a send: the first stops handing out messages, the second aborts."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ..core.errors import ExitCode
from .child import DeliveryProcess

__all__ = ["install_signal_handlers", "restore_signal_handlers"]


def install_signal_handlers(delivery: DeliveryProcess, reporter: Any) -> dict[str, Any]:
    """First SIGINT/SIGTERM: stop handing out messages. Second: abort at once."""
    state: dict[str, Any] = {"signal": None, "previous": {}}
    if threading.current_thread() is not threading.main_thread():
        return state

    def handle(signum: int, frame: Any) -> None:
        if state["signal"] is not None:
            # Every event is in the delivery journal before the next step: stopping both
            # processes now loses nothing (at worst some recipients end as `sending`),
            # and the next `mailer report` or `mailer send` applies the journal.
            delivery.kill()
            os.write(2, b"\nmailer: aborted; every outcome is on record (see `mailer report`).\n")
            os._exit(int(ExitCode.INTERRUPTED))
        state["signal"] = signum
        delivery.stop()
        os.write(2, b"\nmailer: stopping: finishing the messages in flight (press Ctrl-C again to abort)...\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        state["previous"][signum] = signal.signal(signum, handle)
    return state


def restore_signal_handlers(state: dict[str, Any]) -> None:
    for signum, previous in state["previous"].items():
        signal.signal(signum, previous)
