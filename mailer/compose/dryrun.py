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
from typing import IO

from ..core.errors import UsageError
from ..core.outcomes import Outgoing
from .campaign import Campaign, Summary
from .contacts import Contact
from .message import BuiltMessage

__all__ = ["DRY_RUN_FORMATS", "prepare_output_dir", "write_dry_run"]


DRY_RUN_FORMATS = ("mbox", "jsonl")


class _MboxFromLine:
    """The mbox ``From `` line of the current second (formatted once a second, not per message)."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"From MAILER-DAEMON " + time.asctime(time.gmtime(now)).encode() + b"\n"
        return self._line


_MBOX_ESCAPE = re.compile(rb"^(>*From )", re.MULTILINE)

# A dry run's Outgoing carries its contact and built message as the key.
_Pair = tuple[Contact, BuiltMessage]

#: Signs a stream of messages in order, as a real send does (``Signing.signed``).
Sign = Callable[[Iterator[Outgoing[_Pair]]], Iterator[Outgoing[_Pair]]]


def _signed(messages: Iterator[tuple[Contact, BuiltMessage]], sign: Sign) -> Iterator[tuple[Contact, BuiltMessage]]:
    """``messages`` with each message's data replaced by ``sign``'s (signed) data."""
    signed = sign(message.outgoing((contact, message)) for contact, message in messages)
    try:
        for item in signed:
            contact, message = item.key
            yield contact, replace(message, data=item.data)
    finally:
        close = getattr(signed, "close", None)
        if close is not None:
            close()


def prepare_output_dir(folder: Path, *, force: bool = False) -> None:
    """Create ``folder``, or check that it is empty; ``force`` removes its ``.eml`` files first.

    Without ``force``, a folder that holds anything is a :class:`UsageError` (nothing is
    written). With it, only the ``.eml`` files go (what a review consists of); other
    entries are left alone.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise UsageError(f"cannot create the output folder ({exc.strerror}).", path=str(folder)) from None
    if not entries:
        return
    emls = [entry for entry in entries if entry.suffix == ".eml" and entry.is_file()]
    others = len(entries) - len(emls)
    if not force:
        raise UsageError(
            f"the output folder is not empty ({len(emls)} .eml files, {others} other entries): the new "
            "messages would be mixed with what is there.",
            path=str(folder),
            hint="Give a new or empty folder, or add --force to delete its .eml files first.",
        )
    for entry in emls:
        try:
            entry.unlink()
        except OSError as exc:
            raise UsageError(f"cannot remove {entry.name} ({exc.strerror}).", path=str(folder)) from None


def write_dry_run(
    campaign: Campaign,
    summary: Summary,
    *,
    out: IO[bytes] | None = None,
    output_dir: Path | None = None,
    format: str = "mbox",
    force: bool = False,
    on_message: Callable[[], None] | None = None,
    sign: Sign | None = None,
) -> Summary:
    """Render (and with ``sign``, DKIM-sign) every selected message and write it out.

    Nothing touches the network. ``output_dir`` must be empty or new, so that one
    review's files are never mixed with another's; ``force`` first removes the
    ``.eml`` files it holds.
    """
    if format not in DRY_RUN_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(DRY_RUN_FORMATS)}, not {format!r}.")
    if output_dir is not None:
        prepare_output_dir(output_dir, force=force)
    messages: Iterator[tuple[Contact, BuiltMessage]] = campaign.messages(summary)
    if sign is not None:
        messages = _signed(messages, sign)
    from_line = _MboxFromLine()
    # A stream's envelope sender (VERP) is shown as the Return-Path header the receiving
    # server will add (RFC 5321 4.4); it is not part of what is sent or signed.
    show_return_path = campaign.return_path is not None
    destinations = summary.destinations
    for count, (contact, message) in enumerate(messages, 1):
        destinations[contact.envelope.rpartition("@")[2].lower()] += 1
        data = message.data
        if show_return_path:
            data = b"Return-Path: <" + message.sender.encode("utf-8") + b">\r\n" + data
        if output_dir is not None:
            safe = re.sub(r"[^\w.@+-]", "_", contact.email)[:100]
            (output_dir / f"{count:06d}-{safe}.eml").write_bytes(data)
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
            if show_return_path:
                record["return_path"] = message.sender
            out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        else:
            # mboxrd: lines starting with ">*From " get one more ">", so readers can undo it.
            body = data.replace(b"\r\n", b"\n")
            if b"From " in body:
                body = _MBOX_ESCAPE.sub(rb">\1", body)
            out.write(from_line() + body + b"\n")
        summary.counts["rendered"] += 1
        if on_message:
            on_message()
    if out is not None:
        out.flush()
    summary.finished = time.time()
    return summary
