"""Test helpers over the store's real paths: one event or one row at a time, and a row peek."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailer.core.addresses import address_key
from mailer.core.outcomes import Status
from mailer.store.base import SendStore
from mailer.store.records import DELIVERY_COLUMNS, Delivery, SkippedRow, delivery_from_row


def mark_sending(store: SendStore, campaign: str, recipient: str, *, message_id: str, line: int | None = None) -> None:
    """The ``sending`` event the delivery journal records before a transaction."""
    store.record_events(campaign, [(recipient, Status.SENDING, None, None, message_id, line)])


def record_result(
    store: SendStore,
    campaign: str,
    recipient: str,
    *,
    status: str,
    smtp_code: int | None,
    smtp_reply: str | None,
    message_id: str | None = None,
) -> None:
    """The outcome event the delivery journal records after a transaction."""
    store.record_events(campaign, [(recipient, status, smtp_code, smtp_reply, message_id, None)])


def record_skipped(
    store: SendStore, campaign: str, recipient: str, *, status: str, reason: str, line: int | None
) -> None:
    store.record_skipped(campaign, [SkippedRow(recipient, Status(status), reason, line)])


def status_of(store: SendStore, campaign: str, recipient: str) -> Status | None:
    return store.statuses(campaign, [recipient])[0]


def is_suppressed(store: SendStore, address: str) -> bool:
    return store.suppressed([address])[0]


def delivery_row(db_path: Path, campaign: str, recipient: str) -> Delivery | None:
    """The whole row of ``recipient`` in ``campaign``, read from the SQLite file itself."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE campaign = ? AND recipient = ?",
            (campaign, address_key(recipient)),
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else delivery_from_row(row)
