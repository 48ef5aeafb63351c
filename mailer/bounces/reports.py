"""One raw message in, one bounce or complaint report out (or None: not a report).

Three readers, most structured first:

1. **DSN** (RFC 3464): a ``multipart/report`` with a ``message/delivery-status`` part —
   per-recipient ``Original-Recipient`` / ``Final-Recipient``, ``Action``, ``Status``,
   ``Diagnostic-Code`` — and the original's headers in a ``message/rfc822`` or
   ``text/rfc822-headers`` part (Postfix, Exim, Exchange/Outlook, Gmail, Yahoo all
   send this shape; the prose part differs, the machine part does not).
2. **ARF** (RFC 5965): a ``message/feedback-report`` part — ``Feedback-Type``,
   ``Original-Rcpt-To`` — and the original (Yahoo's and Outlook's feedback loops often
   redact the recipient: then only the original's Message-ID or its VERP Return-Path
   says who complained).
3. **flufl.bounce**'s detectors for the non-standard formats (qmail, old Exchange,
   Yahoo's legacy text, ...), only for a message that looks like a bounce (null
   sender, MAILER-DAEMON/postmaster, a bounce subject): its heuristics on a human
   reply could pick up an address from a quoted conversation. It tells who bounced,
   not why, so the reason is looked for in the prose (an RFC 3463 status, "user
   unknown"); addresses that are the original's sender or the bounce's own
   recipient (the detectors can match them in the quoted original) are dropped.

Classification (:class:`BounceKind`): ``hard`` is a 5.x.x that
:func:`mailer.bounces.rules.is_hard_bounce` calls "no such mailbox" (5.1.x but 5.1.7/
5.1.8, 5.2.1); ``soft`` is a 4.x.x, an ``Action: delayed``, or 5.2.2 (mailbox full,
which RFC 3463 itself calls possibly temporary); ``policy`` is any other 5.x.x —
blocked, spam, authentication, message too big — about the *sender*, not the
mailbox, so never a reason to suppress; ``complaint`` is an ARF abuse, fraud or
virus report. ``delivered`` / ``relayed`` / ``expanded`` recipients are dropped.

Hostile input: :func:`parse_report` never raises anything but :class:`ReportError`
(a message that claims to be a report and cannot be read); input is bounded by the
source (:data:`mailer.bounces.sources.MAX_MESSAGE_BYTES`) and here by limits on the
parts walked and text scanned.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes, message_from_string
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from enum import StrEnum

from flufl.bounce import all_failures

from .rules import is_hard_bounce

__all__ = ["BounceKind", "Report", "ReportError", "ReportRecipient", "parse_report"]

_MAX_PARTS = 64  # parts walked per message: real reports have 2-4
_MAX_TEXT = 64 * 1024  # characters of prose scanned for a reason
_MAX_FIELD = 1000  # characters kept of a diagnostic
_MAX_RECIPIENTS = 100  # per report: a DSN is about one message's recipients


class ReportError(ValueError):
    """A message that claims to be a report (DSN, ARF) but cannot be read: skipped and counted."""


class BounceKind(StrEnum):
    """What a report says about one recipient."""

    HARD = "hard"
    SOFT = "soft"
    POLICY = "policy"
    COMPLAINT = "complaint"


@dataclass(frozen=True, slots=True)
class ReportRecipient:
    """One recipient of a report: its address (None when a complaint redacts it), the
    kind, and the RFC 3463 status and diagnostic text when the report gives them."""

    address: str | None
    kind: BounceKind
    status: str | None = None
    diagnostic: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """A bounce or complaint report.

    ``format`` is ``dsn``, ``arf`` or ``heuristic`` (flufl.bounce); ``ref`` identifies
    the report itself (``<its Message-ID>`` or ``sha256:<hex of its bytes>``), so the
    same report read twice is recorded once; ``original_message_ids`` are the
    Message-IDs of the returned original; ``envelope_addresses`` the addresses the
    report was delivered to and the original's Return-Path, where a VERP token would
    be."""

    format: str
    ref: str
    recipients: tuple[ReportRecipient, ...]
    original_message_ids: tuple[str, ...] = ()
    envelope_addresses: tuple[str, ...] = ()
    feedback_type: str | None = None
    truncated: bool = field(default=False, compare=False)


def parse_report(raw: bytes, *, truncated: bool = False) -> Report | None:
    """The report in ``raw``, or None when it is not a bounce or complaint report.

    Raises :class:`ReportError` for a message that claims to be one and cannot be read
    (never anything else, whatever the bytes)."""
    try:
        # Fast path (measured: the full MIME parse of a DSN with its returned original is
        # ~80 % of the time): read the top headers alone; a multipart/report is split at
        # its own boundary, and only its machine-readable parts are parsed in full, the
        # returned original only up to its headers. Mail that is no report and does not
        # look like a bounce is never parsed further.
        top = _HEADERS.parsebytes(raw)
        if top.get_content_type() == "multipart/report":
            parts = _report_parts(top, raw)
            if parts is not None:
                report = _parse(top, parts, raw, truncated)
                if report is not None:
                    return report
        elif not _looks_like_bounce(top):
            return None
        message = message_from_bytes(raw)
        return _parse(message, list(_walk(message)), raw, truncated, heuristics=True)
    except ReportError:
        raise
    except Exception as error:  # hostile input: any failure of the parser is a broken message
        raise ReportError(f"unreadable message ({type(error).__name__})") from None


_HEADERS = BytesHeaderParser()
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _report_parts(top: Message, raw: bytes) -> list[Message] | None:
    """The top-level parts of a multipart/report (RFC 6522: prose, machine part, original),
    or None when they cannot be found this way (then the full parser decides)."""
    boundary = top.get_boundary()
    end = _HEADER_END.search(raw)
    if not boundary or end is None:
        return None
    body = b"\n" + raw[end.end() :]
    delimiter = re.compile(
        rb"\r?\n--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*(?:\r?\n|$)"
    )
    parts: list[Message] = []
    previous: int | None = None
    for match in delimiter.finditer(body):
        if previous is not None:
            parts.append(_report_part(body[previous : match.start()]))
            if len(parts) >= _MAX_PARTS:
                break
        if match.group(1):
            break
        previous = match.end()
    return [top, *parts] if parts else None


def _report_part(data: bytes) -> Message:
    head = _HEADERS.parsebytes(data)
    content_type = head.get_content_type()
    if content_type in ("message/delivery-status", "message/feedback-report", "text/rfc822-headers"):
        return message_from_bytes(data)  # small: parsed (and decoded) in full
    if content_type == "message/rfc822":
        end = _HEADER_END.search(data)
        inner = data[end.end() :] if end is not None else b""
        head.set_payload([_HEADERS.parsebytes(inner[:_MAX_TEXT])])
    return head


def _parse(
    message: Message, parts: list[Message], raw: bytes, truncated: bool, *, heuristics: bool = False
) -> Report | None:
    ref = _report_ref(message, raw)
    envelope = _envelope_addresses(message)
    status_part = _first(parts, "message/delivery-status")
    if status_part is not None:
        recipients = _dsn_recipients(status_part)
        original = _original_headers(parts)
        return Report(
            "dsn",
            ref,
            recipients,
            _message_ids(message, original),
            _unique(envelope + _original_envelope(original)),
            truncated=truncated,
        )
    feedback_part = _first(parts, "message/feedback-report")
    if feedback_part is not None:
        return _arf_report(message, parts, feedback_part, ref, envelope, truncated)
    if heuristics and _looks_like_bounce(message):
        return _heuristic_report(message, parts, ref, envelope, truncated)
    return None


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# --- the walk ---------------------------------------------------------------------------


def _walk(message: Message) -> Iterator[Message]:
    """The message's parts, depth first, at most _MAX_PARTS (no recursion on hostile nesting)."""
    stack = [message]
    seen = 0
    while stack and seen < _MAX_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        if part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(item for item in reversed(payload) if isinstance(item, Message))


def _first(parts: list[Message], content_type: str) -> Message | None:
    for part in parts:
        if part.get_content_type() == content_type:
            return part
    return None


def _report_ref(message: Message, raw: bytes) -> str:
    message_id = _clean_message_id(message.get("Message-ID"))
    if message_id is not None:
        return message_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


_MESSAGE_ID = re.compile(r"<([^<>\s]{1,250})>")


def _clean_message_id(value: object) -> str | None:
    if value is None:
        return None
    match = _MESSAGE_ID.search(str(value))
    return f"<{match.group(1)}>" if match else None


# --- fields -------------------------------------------------------------------------

_ADDRESS = re.compile(r"[^\s<>@,;:\"()\[\]]{1,64}@[A-Za-z0-9.\-_\[\]:]{1,255}")
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([245])\d\d\b")


def _address_field(value: object) -> str | None:
    """The address of ``rfc822; ann@example.com`` (or ``utf-8;``, or a bare address)."""
    if value is None:
        return None
    text = str(value).strip()
    if ";" in text:
        text = text.split(";", 1)[1]
    match = _ADDRESS.search(text.strip().strip("<>"))
    return match.group(0) if match else None


def _text(value: object, limit: int = _MAX_FIELD) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:limit] or None


def _classify(action: str, status: str | None, diagnostic: str | None) -> BounceKind | None:
    """The kind of one DSN recipient (None: not a failure)."""
    if action in ("delivered", "relayed", "expanded"):
        return None
    if action == "delayed":
        return BounceKind.SOFT
    diagnostic = diagnostic or ""
    if status is not None:
        klass = status[0]
        if klass == "2":
            return None
        if klass == "4":
            return BounceKind.SOFT
        if status.startswith("5.2.2"):
            return BounceKind.SOFT
        if not status.endswith(".0.0"):
            # The rules take the enhanced status from the text: the Status field decides.
            return BounceKind.HARD if is_hard_bounce(550, status) else BounceKind.POLICY
        # 5.0.0 says nothing ("other undefined status"): the diagnostic decides, as at RCPT time.
    code = _smtp_code(diagnostic)
    if code is not None and code < 500:
        return BounceKind.SOFT if code >= 400 else None
    if action != "failed" and code is None:
        return None
    return BounceKind.HARD if is_hard_bounce(code or 550, diagnostic) else BounceKind.POLICY


def _smtp_code(diagnostic: str) -> int | None:
    # "smtp; 550 5.1.1 <ann@x.org>: Recipient address rejected"
    text = diagnostic.split(";", 1)[1] if ";" in diagnostic else diagnostic
    match = _SMTP_CODE.search(text[:40])
    return int(match.group(0)) if match else None


def _status_field(value: object) -> str | None:
    if value is None:
        return None
    match = _STATUS.search(str(value))
    return match.group(0) if match else None


# --- DSN ------------------------------------------------------------------------------


def _dsn_recipients(part: Message) -> tuple[ReportRecipient, ...]:
    blocks = part.get_payload()
    if not isinstance(blocks, list):
        # message/delivery-status that the parser could not split into field blocks
        blocks = _split_blocks(str(blocks))
    recipients = []
    for block in blocks[1:]:  # the first block holds the per-message fields
        if not isinstance(block, Message):
            continue
        address = _address_field(block.get("Original-Recipient")) or _address_field(block.get("Final-Recipient"))
        action = (str(block.get("Action", "")).strip().lower().split() or [""])[0]
        status = _status_field(block.get("Status"))
        diagnostic = _text(block.get("Diagnostic-Code"))
        kind = _classify(action, status, diagnostic)
        if kind is None or address is None:
            continue
        recipients.append(ReportRecipient(address, kind, status, diagnostic))
        if len(recipients) >= _MAX_RECIPIENTS:
            break
    if not recipients and not _has_success(blocks):
        raise ReportError("a delivery-status report with no readable recipient")
    return tuple(recipients)


def _has_success(blocks: Sequence[object]) -> bool:
    return any(
        isinstance(block, Message)
        and str(block.get("Action", "")).strip().lower() in ("delivered", "relayed", "expanded")
        for block in blocks[1:]
    )


def _split_blocks(text: str) -> list[Message]:
    return [message_from_string(chunk) for chunk in re.split(r"\r?\n\s*\r?\n", text[:_MAX_TEXT]) if chunk.strip()]


def _original_headers(parts: list[Message]) -> Message | None:
    for part in parts:
        content_type = part.get_content_type()
        if content_type == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif content_type == "text/rfc822-headers":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return message_from_bytes(payload[:_MAX_TEXT])
    return None


def _message_ids(report: Message, original: Message | None) -> tuple[str, ...]:
    found: list[str] = []
    if original is not None:
        message_id = _clean_message_id(original.get("Message-ID"))
        if message_id is not None:
            found.append(message_id)
    # Some servers quote the original's id as a reply would (References, In-Reply-To).
    for name in ("In-Reply-To", "References", "X-Original-Message-ID"):
        for value in report.get_all(name, []):
            for match in _MESSAGE_ID.finditer(str(value)[:_MAX_FIELD]):
                candidate = f"<{match.group(1)}>"
                if candidate not in found:
                    found.append(candidate)
    return tuple(found[:10])


_ENVELOPE_HEADERS = ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")


def _envelope_addresses(message: Message) -> tuple[str, ...]:
    return _addresses_in(message, _ENVELOPE_HEADERS)


def _original_envelope(original: Message | None) -> tuple[str, ...]:
    if original is None:
        return ()
    return _addresses_in(original, ("Return-Path",))


def _addresses_in(message: Message, names: tuple[str, ...]) -> tuple[str, ...]:
    values = [str(value)[:_MAX_FIELD] for name in names for value in message.get_all(name, [])]
    found = []
    for _, address in getaddresses(values):
        if "@" in address and address not in found:
            found.append(address)
    return tuple(found[:20])


# --- ARF ------------------------------------------------------------------------------

_COMPLAINT_TYPES = ("abuse", "fraud", "virus")


def _arf_report(
    message: Message, parts: list[Message], part: Message, ref: str, envelope: tuple[str, ...], truncated: bool
) -> Report:
    fields = part.get_payload()
    if isinstance(fields, list):
        block = fields[0] if fields and isinstance(fields[0], Message) else None
    else:
        block = message_from_string(str(fields)[:_MAX_TEXT])
    if block is None:
        raise ReportError("a feedback report with no fields")
    feedback_type = (str(block.get("Feedback-Type", "")).strip().lower().split() or [""])[0]
    if not feedback_type:
        raise ReportError("a feedback report without Feedback-Type")
    original = _original_headers(parts)
    addresses = [a for a in (_address_field(v) for v in block.get_all("Original-Rcpt-To", [])) if a]
    if not addresses and original is not None:
        # Outlook's JMRP names the recipient in its own header; else the original's To.
        for name in ("X-HmXmrOriginalRecipient", "To"):
            addresses = [a for a in _addresses_in(original, (name,)) if _ADDRESS.fullmatch(a)]
            if addresses:
                break
    recipients: tuple[ReportRecipient, ...] = ()
    if feedback_type in _COMPLAINT_TYPES:
        detail = f"feedback-type {feedback_type}"
        user_agent = _text(block.get("User-Agent"), 100)
        if user_agent:
            detail += f" from {user_agent}"
        recipients = tuple(
            ReportRecipient(address, BounceKind.COMPLAINT, None, detail) for address in addresses[:_MAX_RECIPIENTS]
        ) or (ReportRecipient(None, BounceKind.COMPLAINT, None, detail + " (recipient redacted)"),)
    return Report(
        "arf",
        ref,
        recipients,
        _message_ids(message, original),
        _unique(envelope + _original_envelope(original)),
        feedback_type=feedback_type,
        truncated=truncated,
    )


# --- heuristic bounces (flufl.bounce) ------------------------------------------------

_BOUNCE_SENDER = re.compile(r"mailer-daemon|postmaster|mail delivery (sub)?system|mail.?delivery", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status|failure|notification|has failed|problem)|returned mail"
    r"|failure notice|mail delivery failed|could not be delivered|nondeliverable|non-delivery|delivery failure",
    re.IGNORECASE,
)


def _looks_like_bounce(message: Message) -> bool:
    return_path = str(message.get("Return-Path", ""))
    if return_path.strip() == "<>":
        return True
    if _BOUNCE_SENDER.search(str(message.get("From", ""))[:_MAX_FIELD]):
        return True
    return bool(_BOUNCE_SUBJECT.search(str(message.get("Subject", ""))[:_MAX_FIELD]))


def _heuristic_report(
    message: Message, parts: list[Message], ref: str, envelope: tuple[str, ...], truncated: bool
) -> Report | None:
    try:
        temporary, permanent = all_failures(message)
    except Exception:
        return None  # a detector tripped on it: not a bounce it knows
    original = _original_headers(parts) or _inline_original(parts)
    not_them = {address.lower() for address in envelope}
    if original is not None:
        not_them.update(a.lower() for a in _addresses_in(original, ("From", "Sender", "Reply-To", "Return-Path")))
    not_them.update(a.lower() for a in _addresses_in(message, ("From",)))
    prose = _prose(parts)
    recipients: list[ReportRecipient] = []
    for addresses, permanent_failure in ((permanent, True), (temporary, False)):
        for raw_address in sorted(addresses):
            address = raw_address.decode("ascii", "replace").strip().strip("<>")
            if not _ADDRESS.fullmatch(address) or address.lower() in not_them:
                continue
            if any(r.address == address for r in recipients):
                continue
            status, diagnostic = _reason_near(prose, address)
            if not permanent_failure:
                kind = BounceKind.SOFT
            elif is_hard_bounce(550, diagnostic or ""):
                kind = BounceKind.HARD
            else:
                kind = BounceKind.POLICY
            recipients.append(ReportRecipient(address, kind, status, diagnostic))
    if not recipients:
        return None
    return Report(
        "heuristic",
        ref,
        tuple(recipients[:_MAX_RECIPIENTS]),
        _message_ids(message, original),
        _unique(envelope + _original_envelope(original)),
        truncated=truncated,
    )


_QUOTE_START = re.compile(
    r"^-+ ?(original message|below this line|this is a copy|the original message)[^\n]*\n", re.I | re.M
)


def _first_text(parts: list[Message]) -> str:
    for part in parts:
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload[:_MAX_TEXT].decode("utf-8", "replace")
    return ""


def _prose(parts: list[Message]) -> str:
    """The first text part's text, up to where the quoted original starts."""
    text = _first_text(parts)
    cut = _QUOTE_START.search(text)
    return text[: cut.start()] if cut else text


def _inline_original(parts: list[Message]) -> Message | None:
    """The original quoted in the prose (qmail, old Exchange): headers after the break line."""
    text = _first_text(parts)
    cut = _QUOTE_START.search(text)
    if cut is None:
        return None
    quoted = message_from_string(text[cut.end() :].lstrip("\n"))
    return quoted if quoted.keys() else None


def _reason_near(prose: str, address: str) -> tuple[str | None, str | None]:
    """The RFC 3463 status and the line(s) that follow ``address`` in the prose."""
    index = prose.lower().find(address.lower())
    window = prose[index : index + 600] if index >= 0 else prose[:600]
    status = _STATUS.search(window)
    return (status.group(0) if status else None), _text(window)
