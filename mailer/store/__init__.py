"""The store: the send log, run history and suppression list, behind the SendStore interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import LogConfig
    from .base import SendStore

__all__ = ["open_store"]


def open_store(log: LogConfig, *, create: bool = True, pool_size: int | None = None) -> SendStore:
    """Open the store that ``[log]`` names (PostgreSQL at ``log.url``, else SQLite at
    ``log.path``), creating it if need be.

    With ``create=False`` a missing store is an error (for ``mailer report``).
    ``pool_size``: PostgreSQL through a pool of up to that many connections (``mailer
    serve``); SQLite has no use for one. Raises
    :class:`~mailer.core.errors.SendLogError` when it cannot be used.
    """
    if log.url is not None:
        from .postgres import PostgresStore

        return PostgresStore.open(log, create=create, pool_size=pool_size)
    from .sqlite import SendLog

    return SendLog.open(log.path, create=create)
