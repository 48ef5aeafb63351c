"""DKIM-Signature header fields made without dkimpy: relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4).

dkimpy spends about 1 ms of Python per message on parsing, canonicalizing and
bookkeeping, several times what OpenSSL needs for the RSA-2048 signature. This
module does only what one signature needs: it parses the header block (a dozen
short lines), canonicalizes the fields that are signed, hashes the body in one pass
of C code (``re`` and ``hashlib``, no per-line Python), and leaves the private-key
operation to a callable (OpenSSL through ``cryptography``, which releases the GIL).

The output is dkimpy 1.1's, byte for byte, for the same key, header list and time:
the same tags in the same order (``v a c d i q s t h bh b``), the same folding at
column 72 (the header is hashed as folded, so the folding decides ``b=``), the same
reading of LF and CRLF input. ``tests/test_dkim_relaxed.py`` proves it with property
tests against dkimpy's ``sign`` and ``verify``; dkimpy stays the reference there and
in the signer's self-test at key load.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence

from ..core.errors import DKIMError

__all__ = [
    "canonical_body",
    "fold_tag_list",
    "parse_header_block",
    "relaxed_header",
    "select_fields",
    "sign_relaxed",
]

# The first empty line: a line feed, then an empty line (CRLF or LF). dkimpy splits
# lines at "\r?\n", so a CR before a line feed belongs to the line break.
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LINE_BREAK = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_WSP_RUN = re.compile(rb"[\t ]+")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_SIGNATURE_NAME = b"DKIM-Signature"
_SIGNATURE_NAME_LOWER = b"dkim-signature"
#: dkimpy folds at column 72, the first line shortened by the field name.
_FOLD_WIDTH = 72
_PLACEHOLDER = b"0" * 60  # dkimpy's b= stand-in while it folds (see fold_tag_list)


def parse_header_block(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The header fields of ``message`` as ``(name, raw value)`` and where its body starts.

    A raw value is what follows the colon, continuation lines included, each line
    ended by CRLF whatever the input's line ending (as dkimpy reads them). An mbox
    ``From `` line is skipped. Raises :class:`DKIMError` for a line that is neither a
    field, a continuation nor a ``From `` line.
    """
    if message[:1] == b"\n" or message[:2] == b"\r\n":
        return [], 1 if message[:1] == b"\n" else 2
    blank = _BLANK_LINE.search(message)
    if blank is None:
        head, body_start = message, len(message)
    else:
        end = blank.start()
        head = message[: end - 1] if end and message[end - 1 : end] == b"\r" else message[:end]
        body_start = blank.end()
    lines = _LINE_BREAK.split(head)
    if blank is None and lines and not lines[-1]:
        lines.pop()  # the line break that ends the last field
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise DKIMError("cannot DKIM-sign this message: it starts with a continuation line.")
            fields[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            fields.append([match.group(1), line[match.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            shown = line[:60].decode("ascii", "replace")
            raise DKIMError(f"cannot DKIM-sign this message: unexpected characters in its header ({shown!r}).")
    return [(name, value) for name, value in fields], body_start


def canonical_body(body: bytes) -> bytes:
    """The relaxed body (RFC 6376 §3.4.4) of a body with CRLF or LF line endings.

    White space at the end of a line goes, runs of it become one space, empty lines
    at the end go, and a non-empty body ends with exactly one CRLF. Every step is one
    pass of C code, and skipped when a cheap ``in`` test shows it has nothing to do
    (a quoted-printable body has no trailing white space and seldom a tab).
    """
    if b"\n" in body and body.count(b"\n") != body.count(b"\r\n"):
        body = _BARE_LF.sub(b"\r\n", body)
    if b"\t" in body or b" \r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == len(body):
        body += b"\r\n"  # no line break at the end: one is added
    elif end == 0:
        return b""  # only empty lines: the empty body
    else:
        body = body[: end + 2]
    return b"" if body == b"\r\n" else body


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """One field in relaxed canonical form (RFC 6376 §3.4.2), ending in CRLF."""
    unfolded = value.replace(b"\r\n", b"").replace(b"\n", b"")
    return name.lower().rstrip() + b":" + _WSP_RUN.sub(b" ", unfolded).strip() + b"\r\n"


def select_fields(fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """The field instances that ``names`` (the ``h=`` list, lower case) sign, in order.

    RFC 6376 §5.4.2: a name listed n times signs the last n instances from the bottom
    up; a name listed once more than it occurs signs the absence of another one.
    """
    chosen: list[tuple[bytes, bytes]] = []
    below: dict[bytes, int] = {}
    lowered = [name.lower() for name, _ in fields]
    for wanted in names:
        index = below.get(wanted, len(fields))
        while index > 0:
            index -= 1
            if lowered[index] == wanted:
                chosen.append(fields[index])
                break
        below[wanted] = index
    return chosen


def fold_tag_list(value: bytes, *, name_length: int, linesep: bytes) -> bytes:
    """Fold a tag list as dkimpy 1.1 does: lines of at most 72 characters, the first one
    shortened by ``name_length``, cut at the last space that fits, or inside a word
    longer than a line (only ``b=`` is that long, or a domain of more than ~65 octets).
    """
    width = _FOLD_WIDTH - name_length
    if len(value) <= width:
        return value
    if len(value) - value.rfind(b"\r\n") == 2 and len(value) <= width + 2:
        return value
    pieces: list[bytes] = []
    while len(value) > width:
        space = value.rfind(b" ", 0, width)
        if space == -1:
            pieces.append(value[:width])
            value = value[width:]
        else:
            pieces.append(value[:space])
            value = value[space + 1 :]
        width = _FOLD_WIDTH - 1
    pieces.append(value)
    return (linesep + b" ").join(pieces)


def sign_relaxed(
    message: bytes,
    *,
    domain: bytes,
    selector: bytes,
    algorithm: bytes,
    include: Callable[[list[tuple[bytes, bytes]]], list[bytes]],
    sign_digest: Callable[[bytes], bytes],
    timestamp: int,
) -> bytes:
    """The ``DKIM-Signature:`` field (with its line break) that signs ``message``.

    ``include`` picks the ``h=`` list (lower-case names) from the parsed fields;
    ``sign_digest`` turns the SHA-256 digest of the canonical header data into the
    signature (RSASSA-PKCS1-v1_5 or Ed25519, RFC 8463 §3). The line ending of the
    field follows the message's first line.
    """
    newline = message.find(b"\n")
    linesep = b"\r\n" if newline > 0 and message[newline - 1] == 0x0D else b"\n"
    fields, body_start = parse_header_block(message)
    names = include(fields)
    body_hash = base64.b64encode(hashlib.sha256(canonical_body(message[body_start:])).digest())
    head = b"".join(
        (
            b"v=1; a=",
            algorithm,
            b"; c=relaxed/relaxed; d=",
            domain,
            b"; i=@",
            domain,
            b"; q=dns/txt; s=",
            selector,
            b"; t=",
            str(timestamp).encode("ascii"),
            b"; h=",
            b" : ".join(names),
            b"; bh=",
            body_hash,
            b"; b=",
        )
    )
    name_length = len(_SIGNATURE_NAME)
    # Folded with a 60-character stand-in for b=, which is then removed: what is
    # hashed keeps the folds before b= that the final field has (RFC 6376 §3.5: the
    # signature is computed with an empty b=).
    folded = fold_tag_list(head + _PLACEHOLDER, name_length=name_length, linesep=b"\r\n")
    unsigned = folded[: folded.rindex(b"b=") + 2]
    hashed = b"".join(relaxed_header(name, value) for name, value in select_fields(fields, names))
    hashed += relaxed_header(_SIGNATURE_NAME_LOWER, b" " + unsigned).rstrip()
    signature = base64.b64encode(sign_digest(hashlib.sha256(hashed).digest()))
    value = fold_tag_list(head + signature + linesep, name_length=name_length, linesep=linesep)
    return _SIGNATURE_NAME + b": " + value
