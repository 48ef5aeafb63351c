"""The dry run's writers: every built message as an mbox stream, JSON lines or ``.eml`` files.

The messages are exactly what a real send would hand to the relay (DKIM-signed by
the ``sign`` the caller passes, the same signing as a real send); nothing here
touches the network or the send log.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, cast

from ..core.errors import UsageError
from ..core.outcomes import Outgoing
from .campaign import Campaign, Summary
from .contacts import Contact
from .message import BuiltMessage

__all__ = ["DRY_RUN_FORMATS", "write_dry_run"]


DRY_RUN_FORMATS = ("mbox", "jsonl")


def _mbox_from_line() -> bytes:
    return b"From MAILER-DAEMON " + time.asctime(time.gmtime()).encode() + b"\n"


_MBOX_ESCAPE = re.compile(rb"^(>*From )", re.MULTILINE)

#: Signs a stream of messages in order, as a real send does (``Signing.signed``).
Sign = Callable[[Iterator[Outgoing]], Iterator[Outgoing]]


def _signed(messages: Iterator[tuple[Contact, BuiltMessage]], sign: Sign) -> Iterator[tuple[Contact, BuiltMessage]]:
    """``messages`` with each message's data replaced by ``sign``'s (signed) data."""
    signed = sign(message.outgoing((contact, message)) for contact, message in messages)
    try:
        for item in signed:
            pair = cast("tuple[Contact, BuiltMessage]", item.key)
            yield pair[0], replace(pair[1], data=item.data)
    finally:
        close = getattr(signed, "close", None)
        if close is not None:
            close()


def write_dry_run(
    campaign: Campaign,
    summary: Summary,
    *,
    out: IO[bytes] | None = None,
    output_dir: Path | None = None,
    format: str = "mbox",
    on_message: Callable[[], None] | None = None,
    sign: Sign | None = None,
) -> Summary:
    """Render (and with ``sign``, DKIM-sign) every selected message and write it out.

    Nothing touches the network.
    """
    if format not in DRY_RUN_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(DRY_RUN_FORMATS)}, not {format!r}.")
    if output_dir is not None:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the output folder ({exc.strerror}).", path=str(output_dir)) from None
    messages: Iterator[tuple[Contact, BuiltMessage]] = campaign.messages(summary)
    if sign is not None:
        messages = _signed(messages, sign)
    for count, (contact, message) in enumerate(messages, 1):
        if output_dir is not None:
            safe = re.sub(r"[^\w.@+-]", "_", contact.email)[:100]
            (output_dir / f"{count:06d}-{safe}.eml").write_bytes(message.data)
        elif out is None:
            raise TypeError("write_dry_run() needs out= (a binary stream) or output_dir=")
        elif format == "jsonl":
            record = {
                "to": message.to,
                "recipients": message.recipients,
                "subject": message.subject,
                "message_id": message.message_id,
                "size": len(message.data),
                "attachments": message.attachments,
                "line": contact.line,
            }
            out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        else:
            # mboxrd: lines starting with ">*From " get one more ">", so readers can undo it.
            body = message.data.replace(b"\r\n", b"\n")
            if b"From " in body:
                body = _MBOX_ESCAPE.sub(rb">\1", body)
            out.write(_mbox_from_line() + body + b"\n")
        summary.counts["rendered"] += 1
        if on_message:
            on_message()
    if out is not None:
        out.flush()
    summary.finished = time.time()
    return summary
