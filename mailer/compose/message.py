"""Fast MIME message building.

The standard library's ``EmailMessage`` builds only a few hundred multipart messages a
second, which would make building the bottleneck of the whole tool. This builder
writes the wire format directly: boundaries are fixed per run, bodies are
quoted-printable (done in C by ``binascii``), attachments are encoded once per file.
The property tests in ``tests/test_message.py`` check that every message parses back,
without defects, to what the ``email`` package itself builds from the same input.

Safety rules that hold for every message:
* a header value from a template (and so from the CSV) that contains CR, LF or NUL
  is refused (:class:`~mailer.core.errors.RowError`), so no value can add a header;
* a value cannot change how many addresses an address header of the template holds
  (``Rendered.address_counts``), so no value can add a recipient;
* boundaries start with ``=_``, which quoted-printable and base64 output can never
  contain, so no body can end a MIME part early;
* every line stays under 998 octets (RFC 5322 §2.1.1): headers are folded or
  RFC 2047-encoded, bodies are quoted-printable, attachments base64.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import os
import re
import secrets
import stat as stat_module
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses, quote
from pathlib import Path

from ..core.addresses import AddressCheck, check_address
from ..core.errors import RowError
from ..core.outcomes import KeyT, Outgoing
from .contacts import Contact
from .templates import Rendered

__all__ = ["ADDRESS_HEADERS", "BuiltMessage", "MessageBuilder", "encode_unstructured", "encode_words"]


ADDRESS_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "sender"}
_FORBIDDEN = re.compile(r"[\r\n\x00]")
_SINGLE_ADDRESS = re.compile(r"^\s*(.*?)\s*<([^<>]*)>\s*$", re.DOTALL)
_NEEDS_ENCODING = re.compile(r"=\?|\S{900,}")
# A display name that formataddr writes as it is (no quoting, no encoded-words): ASCII
# letters, digits, single inner spaces and the atext symbols of RFC 5322 §3.2.3 but "=".
_PLAIN_DISPLAY = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/?^_`{|}~-]+)*")
_MAX_LINE = 78  # RFC 5322 §2.1.1 "SHOULD" limit; the hard limit is 998
_CACHE_LIMIT = 1024
_ATTACHMENT_CACHE_BYTES = 1 << 20


@dataclass(slots=True)
class BuiltMessage:
    """A message ready for the wire (CRLF line endings) and what the log needs of it."""

    data: bytes
    message_id: str
    sender: str  # envelope MAIL FROM
    recipients: list[str]  # envelope RCPT TO
    to: str  # the contact's address
    subject: str
    attachments: list[str] = field(default_factory=list)
    smtputf8: bool = False

    def outgoing(self, key: KeyT) -> Outgoing[KeyT]:
        """This message as handed to delivery (or to the signing of a dry run)."""
        return Outgoing(
            key=key,
            sender=self.sender,
            recipients=self.recipients,
            data=self.data,
            message_id=self.message_id,
            smtputf8=self.smtputf8,
        )


_ENCODED_WORD_BYTES = 45  # 60 base64 characters: 75 with "=?utf-8?b?" and "?=" (RFC 2047 §2)
# Where a name or a subject may be cut into encoded-words: a single space between words.
_WORD_BREAK = re.compile(r"(?<=\S) (?=\S)")


def _encoded_word(data: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def _split_characters(data: str) -> list[bytes]:
    """A word too long for one encoded-word, cut between characters (RFC 2047 §5)."""
    chunks: list[bytes] = []
    chunk = bytearray()
    for char in data:
        encoded = char.encode("utf-8", "surrogatepass")
        if len(chunk) + len(encoded) > _ENCODED_WORD_BYTES:
            chunks.append(bytes(chunk))
            chunk.clear()
        chunk += encoded
    chunks.append(bytes(chunk))
    return chunks


def encode_words(text: str, *, phrase: bool = True) -> list[str]:
    """RFC 2047 base64 encoded-words for ``text``, each at most 75 characters, to be
    joined with spaces (or folds).

    Encoded-words are cut only at a space between two words, where one fits: a reader
    that keeps the white space between two encoded-words (Python's address parser, and
    some mail clients) would otherwise show a gap inside the word ("Sánche z"). In a
    display name (``phrase``) that space is the one between the encoded-words, which
    such readers keep; in an unstructured header (Subject) it ends the first word,
    because there every reader drops the white space between encoded-words (RFC 2047
    §6.2). Only a word of more than 45 bytes of UTF-8 is cut inside, between whole
    characters (§5); the spaces on either side of such a word are encoded with it, so
    that a reader that follows §6.2 reads the name exactly.
    """
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= _ENCODED_WORD_BYTES:
        return [_encoded_word(data)]
    words = _WORD_BREAK.split(text)
    last = len(words) - 1
    encoded_words: list[str] = []
    chunk = b""
    space_encoded = not phrase  # does ``chunk`` end with the space before the next word?
    for index, word in enumerate(words):
        encoded = word.encode("utf-8", "surrogatepass")
        if len(encoded) > _ENCODED_WORD_BYTES:
            if chunk:
                encoded_words.append(_encoded_word(chunk))
            before = " " if index and phrase and not space_encoded else ""
            *whole, chunk = _split_characters(before + word + (" " if index < last else ""))
            encoded_words.extend(_encoded_word(piece) for piece in whole)
            space_encoded = True
            continue
        if not phrase and index < last:
            encoded += b" "
        joined = chunk + encoded if space_encoded or not chunk else chunk + b" " + encoded
        if len(joined) <= _ENCODED_WORD_BYTES:
            chunk = joined
        else:
            encoded_words.append(_encoded_word(chunk))
            chunk = encoded
        space_encoded = not phrase
    encoded_words.append(_encoded_word(chunk))
    return encoded_words


def _fold(name: str, pieces: list[str]) -> str:
    """Join ``pieces`` after ``Name:`` with spaces, folding before a piece when a line would pass 78."""
    line = f"{name}:"
    lines: list[str] = []
    for index, piece in enumerate(pieces):
        # Never fold after a whitespace-only line: RFC 5322 §3.2.2 forbids such lines.
        if index > 0 and len(line) + 1 + len(piece) > _MAX_LINE and line.strip():
            lines.append(line)
            line = " " + piece
        else:
            line += " " + piece
    lines.append(line)
    return "\r\n".join(lines)


def encode_unstructured(name: str, value: str) -> str:
    """One header line (folded) for an unstructured value such as Subject."""
    if value.isascii() and not _NEEDS_ENCODING.search(value):
        if len(name) + len(value) + 2 <= _MAX_LINE:
            return f"{name}: {value}"
        # Folding inserts CRLF before an existing space, so unfolding restores the value.
        words = value.split(" ")
        line = f"{name}: {words[0]}"
        lines = []
        for word in words[1:]:
            if len(line) + 1 + len(word) > _MAX_LINE and line.strip():
                lines.append(line)
                line = " " + word
            else:
                line += " " + word
        lines.append(line)
        return "\r\n".join(lines)
    return _fold(name, encode_words(value, phrase=False))


def _qp(text: str) -> bytes:
    if not text.endswith("\n"):
        text += "\n"
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = text.encode("utf-8", "surrogateescape")
    return binascii.b2a_qp(data).replace(b"\n", b"\r\n")


def _disposition(filename: str) -> str:
    if filename.isascii() and filename.isprintable():
        return f'attachment; filename="{quote(filename)}"'
    # RFC 2231 §4: charset and percent-encoded value for a non-ASCII parameter.
    return "attachment; filename*=utf-8''" + urllib.parse.quote(filename, safe="")


class MessageBuilder:
    """Builds messages for one run. Not thread-safe; use one per producing thread.

    ``default_from``, ``default_reply_to`` and ``list_id`` come from ``[message]`` in the
    config (``list_label``: the campaign's, for the default List-Id);
    ``extra_headers`` are added to every message (List-Unsubscribe and the like are
    passed per message to :meth:`build`).
    """

    def __init__(
        self,
        *,
        default_from: str | None = None,
        default_reply_to: str | None = None,
        list_id: str | None = None,
        list_label: str | None = None,
        clock: Callable[[], float] = time.time,
        token: Callable[[int], str] = secrets.token_hex,
    ) -> None:
        self.default_from = default_from
        self.default_reply_to = default_reply_to
        # List-Id (RFC 2919): ``list_id`` as given, else ``<list_label.sender domain>``.
        self.list_id = list_id
        self.list_label = list_label
        self._clock = clock
        run_token = token(8)
        self._mixed_boundary = f"=_m_{run_token}"
        self._alternative_boundary = f"=_a_{run_token}"
        self._id_prefix = time.strftime("%Y%m%d%H%M%S", time.gmtime(clock())) + "." + run_token
        self._counter = 0
        self._date_second = -1
        self._date = ""
        # (header name, value, expected count) -> _encode_address_header's result
        self._address_cache: dict[tuple[str, str, int | None], tuple[str, list[str], bool]] = {}
        self._attachment_cache: dict[str, tuple[int, int, bytes]] = {}
        # The same for every message of the run: written once, joined per message.
        alternative = self._alternative_boundary.encode("ascii")
        self._text_part_head = (
            b"--" + alternative + b"\r\n"
            b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
        )
        self._html_part_head = (
            b"\r\n--" + alternative + b"\r\n"
            b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
        )
        self._alternative_end = b"\r\n--" + alternative + b"--\r\n"
        self._alternative_type = f'Content-Type: multipart/alternative; boundary="{self._alternative_boundary}"'
        # header name -> lower-cased (the names are the template's, so a handful)
        self._lowered: dict[str, str] = {}

    # -- headers -------------------------------------------------------------------
    def _encode_address_header(
        self, name: str, value: str, contact: Contact | None = None, expected: int | None = None
    ) -> tuple[str, list[str], bool]:
        """Return the header line, the envelope addresses and whether SMTPUTF8 is needed.

        ``expected`` is how many addresses the template's own text puts in this header
        (see ``Rendered.address_counts``): with one, everything before the last ``<...>``
        is the display name, whatever it holds; otherwise a row whose values change the
        count is refused. ``contact``'s own address was validated when the CSV was read;
        it is not checked twice.
        """
        key = (name, value, expected)
        cached = self._address_cache.get(key)
        if cached is not None:
            return cached
        single = _SINGLE_ADDRESS.match(value)
        if (
            # The per-contact To: of most templates, "Name <address>" with a plain ASCII
            # name and the contact's own address: the line the steps below would write,
            # without them (tests/test_compose_differential.py compares the two).
            single is not None
            and expected == 1
            and contact is not None
            and not contact.smtputf8
            and single.group(2).strip() == contact.email
            and _PLAIN_DISPLAY.fullmatch(single.group(1))
        ):
            line = f"{name}: {single.group(1)} <{contact.envelope}>"
            if len(line) + 1 <= _MAX_LINE:
                return line, [contact.envelope], False
        if single and (
            expected == 1 or (expected is None and "<" not in single.group(1) and ">" not in single.group(1))
        ):
            display = single.group(1)
            if len(display) >= 2 and display[0] == display[-1] == '"':
                display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            pairs = [(display, single.group(2).strip())]
        else:
            pairs = getaddresses([value])
        if not pairs or any(not address for _, address in pairs):
            raise RowError(f"the {name}: header {value!r} is not a valid address or list of addresses")
        if expected is not None and len(pairs) != expected:
            raise RowError(
                f"the {name}: header {value!r} holds {len(pairs)} addresses where the template writes {expected} "
                "(a value from the CSV with a comma or <>?); the row is refused so that no value can add a recipient"
            )
        formatted: list[str] = []
        envelope: list[str] = []
        needs_utf8 = False
        for display, address in pairs:
            if contact is not None and address == contact.email:
                checked = AddressCheck(contact.email, contact.envelope, contact.smtputf8)
            else:
                try:
                    checked = check_address(address)
                except ValueError as exc:
                    raise RowError(f"the {name}: header has an invalid address {address!r} ({exc})") from None
            header_address = checked.address if checked.smtputf8 else checked.envelope
            needs_utf8 = needs_utf8 or checked.smtputf8
            envelope.append(checked.envelope)
            if not display:
                formatted.append(header_address)
            elif display.isascii() and not _NEEDS_ENCODING.search(display):
                if header_address.isascii():
                    formatted.append(formataddr((display, header_address)))
                else:
                    # formataddr refuses a non-ASCII address (UnicodeEncodeError, which
                    # ended the run); an SMTPUTF8 header carries it as UTF-8 (RFC 6532).
                    formatted.append(formataddr((display, ""))[:-2] + f"<{header_address}>")
            else:
                formatted.append(" ".join(encode_words(display)) + f" <{header_address}>")
        pieces = [piece + "," for piece in formatted[:-1]] + formatted[-1:]
        if len(name) + 2 + sum(len(piece) + 1 for piece in pieces) > _MAX_LINE:
            # A long display name: fold at its spaces too (folding white space may
            # stand in a quoted string, and between encoded words it is ignored).
            pieces = [word for piece in pieces for word in piece.split(" ")]
        result = (_fold(name, pieces), envelope, needs_utf8)
        if len(self._address_cache) < _CACHE_LIMIT:
            self._address_cache[key] = result
        return result

    def _date_header(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(now, localtime=True)
        return self._date

    # -- attachments ---------------------------------------------------------------
    def _attachment_part(self, path: Path) -> bytes:
        key = str(path)
        try:
            stat = os.stat(key)
        except FileNotFoundError:
            raise RowError(f"attachment {key} not found") from None
        except OSError as exc:
            raise RowError(f"attachment {key} cannot be read ({exc.strerror})") from None
        if not stat_module.S_ISREG(stat.st_mode) and not stat_module.S_ISDIR(stat.st_mode):
            # A FIFO would block the run forever, /dev/zero fill the memory.
            raise RowError(f"attachment {key} is not a regular file (a pipe, device or socket)")
        cached = self._attachment_cache.get(key)
        if cached is not None and cached[0] == stat.st_mtime_ns and cached[1] == stat.st_size:
            return cached[2]
        try:
            content = path.read_bytes()
        except IsADirectoryError:
            raise RowError(f"attachment {key} is a folder, not a file") from None
        except OSError as exc:
            raise RowError(f"attachment {key} cannot be read ({exc.strerror})") from None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        part = (
            f"Content-Type: {content_type}\r\n"
            f"Content-Disposition: {_disposition(path.name)}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode("ascii") + base64.encodebytes(content).replace(b"\n", b"\r\n")
        if stat.st_size <= _ATTACHMENT_CACHE_BYTES:
            if len(self._attachment_cache) >= 64:
                self._attachment_cache.pop(next(iter(self._attachment_cache)))
            self._attachment_cache[key] = (stat.st_mtime_ns, stat.st_size, part)
        return part

    # -- the message ---------------------------------------------------------------
    def build(
        self,
        rendered: Rendered,
        *,
        contact: Contact,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> BuiltMessage:
        """Build one message. Raises :class:`RowError` when this contact's message cannot be built."""
        address_counts = rendered.address_counts
        lines: list[str] = []
        present: set[str] = set()
        sender: str | None = None
        recipients: list[str] = []
        smtputf8 = contact.smtputf8
        subject = ""
        headers = rendered.headers
        if extra_headers:
            headers = headers + extra_headers
        for name, value in headers:
            if _FORBIDDEN.search(value):
                raise RowError(
                    f"the {name}: header would contain a line break (a value from the CSV with a newline?); "
                    "a header cannot be split, so the row is refused to prevent header injection"
                )
            value = value.strip()
            lowered = self._lowered.get(name)
            if lowered is None:
                lowered = name.lower()
                if len(self._lowered) < _CACHE_LIMIT:
                    self._lowered[name] = lowered
            present.add(lowered)
            if lowered in ADDRESS_HEADERS:
                if not value and lowered in ("cc", "bcc", "reply-to"):
                    continue  # an optional header left empty by the template for this row
                line, addresses, needs_utf8 = self._encode_address_header(
                    name, value, contact, address_counts.get(lowered)
                )
                smtputf8 = smtputf8 or needs_utf8
                if lowered == "from":
                    sender = addresses[0]
                elif lowered in ("to", "cc", "bcc"):
                    recipients.extend(addresses)
                if lowered == "bcc":
                    continue  # envelope only: a Bcc header would disclose the list
                lines.append(line)
            else:
                if lowered == "subject":
                    subject = value
                lines.append(encode_unstructured(name, value))
        if "from" not in present:
            if not self.default_from:
                raise RowError("the message has no From: (set it in the template or as [message] from in mailer.toml)")
            line, addresses, needs_utf8 = self._encode_address_header("From", self.default_from)
            sender = addresses[0]
            smtputf8 = smtputf8 or needs_utf8
            lines.insert(0, line)
        if "to" not in present:
            header_address = contact.email if contact.smtputf8 else contact.envelope
            lines.insert(1, f"To: {header_address}")
            recipients.insert(0, contact.envelope)
        if "reply-to" not in present and self.default_reply_to:
            line, _, needs_utf8 = self._encode_address_header("Reply-To", self.default_reply_to)
            lines.append(line)
        self._counter += 1
        domain = sender.rpartition("@")[2] if sender else "localhost"
        message_id = f"<{self._id_prefix}.{self._counter}@{domain}>"
        if "list-id" not in present:
            if self.list_id:
                lines.append(f"List-Id: {self.list_id}")
            elif self.list_label:
                lines.append(f"List-Id: <{self.list_label}.{domain}>")
        lines.append(f"Date: {self._date_header()}")
        lines.append(f"Message-ID: {message_id}")
        lines.append("MIME-Version: 1.0")

        text_part = _qp(rendered.text)
        if rendered.html is not None:
            body = b"".join(
                (self._text_part_head, text_part, self._html_part_head, _qp(rendered.html), self._alternative_end)
            )
            body_type = self._alternative_type
        else:
            body = text_part
            body_type = 'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable'

        attachment_names: list[str] = []
        if rendered.attachments:
            m = self._mixed_boundary.encode()
            chunks = [b"--" + m + b"\r\n" + body_type.encode() + b"\r\n\r\n" + body]
            for path in rendered.attachments:
                chunks.append(b"\r\n--" + m + b"\r\n" + self._attachment_part(path))
                attachment_names.append(path.name)
            chunks.append(b"\r\n--" + m + b"--\r\n")
            body = b"".join(chunks)
            body_type = f'Content-Type: multipart/mixed; boundary="{self._mixed_boundary}"'
        lines.append(body_type)
        head = "\r\n".join(lines) + "\r\n\r\n"
        data = head.encode("utf-8" if smtputf8 else "ascii", "strict") + body
        return BuiltMessage(
            data=data,
            message_id=message_id,
            sender=sender or "",
            recipients=recipients,
            to=contact.email,
            subject=subject,
            attachments=attachment_names,
            smtputf8=smtputf8,
        )
