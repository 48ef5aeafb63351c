"""``engagement`` in ``--where``: each contact's history over all campaigns of the send log.

The history is read once per run, in one query (:meth:`SendStore.engagement_history`),
into a dict keyed by address key, holding plain tuples; a contact's ``engagement``
mapping is built only when the ``--where`` is evaluated for it. A run whose ``--where``
does not mention ``engagement`` reads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..core.addresses import address_key
from ..core.config import Config

__all__ = ["EngagementLookup", "load_engagement", "mentions_engagement"]

History = tuple[int, int, int, int, str | None, str | None, str | None]
_NONE: History = (0, 0, 0, 0, None, None, None)


def mentions_engagement(expression: str | None) -> bool:
    """Whether ``--where`` uses the ``engagement`` variable (then the history is loaded)."""
    return expression is not None and "engagement" in expression


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class EngagementLookup:
    """The ``engagement`` mapping of a contact, from the history loaded once per run."""

    def __init__(self, history: Mapping[str, History], *, clock: Callable[[], float] = time.time) -> None:
        self._history = history
        self._now = datetime.fromtimestamp(clock(), UTC)  # one "now" for the whole run

    def __len__(self) -> int:
        return len(self._history)

    def of(self, address: str) -> dict[str, Any]:
        """``engagement.*`` for ``address``: counts, last times (datetime or None), days since."""
        sent, opens, clicks, bounces, last_open, last_click, last_sent = self._history.get(address_key(address), _NONE)
        opened, clicked = _when(last_open), _when(last_click)
        return {
            "sent": sent,
            "opens": opens,
            "clicks": clicks,
            "bounces": bounces,
            "last_open": opened,
            "last_click": clicked,
            "last_sent": _when(last_sent),
            "days_since_open": None if opened is None else (self._now - opened).days,
            "days_since_click": None if clicked is None else (self._now - clicked).days,
        }


def load_engagement(config: Config, *, clock: Callable[[], float] = time.time) -> EngagementLookup:
    """The history of ``config``'s send log (empty when there is no log yet)."""
    from ..store import open_store

    if not config.log.path.exists():
        return EngagementLookup({}, clock=clock)
    with open_store(config.log, create=False) as store:
        return EngagementLookup(store.engagement_history(), clock=clock)
