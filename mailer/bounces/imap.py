"""An IMAP mailbox as a bounce source: ``imaps://user@host[:port]/MAILBOX``.

``imaps://`` is TLS from the first byte (port 993); ``imap://`` is STARTTLS (port
143), and a server that offers no STARTTLS gets the password in clear text only when
it is on this machine (the name *and* the connected address are loopback, the rule of
the SMTP side). Certificates are verified against the system's trust store.

Messages are found with one ``UID SEARCH`` (``ALL`` or ``SINCE``) and fetched with
``BODY.PEEK[]`` (reading marks nothing) in batches of at most ``batch_size`` messages
and about ``batch_bytes`` bytes (sizes asked first), so memory stays bounded whatever
the mailbox holds; a message over ``max_message_bytes`` is read only up to that size
(``truncated``). A message's ``ref`` is ``UIDVALIDITY:UID``: stable across runs for
as long as the server keeps the mailbox's UIDVALIDITY (RFC 3501 2.3.1.1). A
connection lost mid-way is reopened (a few times) and the batch fetched again;
UIDVALIDITY changing meanwhile stops the run, since the UIDs no longer mean the same
messages.

What :meth:`IMAPSource.mark_processed` does follows the command's options
(:class:`MarkAction`): nothing (the default; the mailbox is opened read-only with
EXAMINE), the ``\\Seen`` flag (``--mark-seen``), or (``--move-to FOLDER``) ``\\Seen``
and a move to FOLDER with ``UID MOVE`` (RFC 6851), or, where MOVE is not offered,
``UID COPY`` + ``\\Deleted`` + ``UID EXPUNGE`` (RFC 4315) or, without UIDPLUS, a
plain ``EXPUNGE`` (which also removes any other message of the mailbox
already flagged ``\\Deleted``: that is what deleting means there).

The password is never in an error, and the ``--debug`` trace (imapclient's protocol
log) is muted during LOGIN and scrubbed of the password in every form it could take.
"""

from __future__ import annotations

import datetime as dt
import functools
import imaplib
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from imapclient import DELETED, SEEN, IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from ..core.errors import ExitCode
from ..smtp.policy import is_loopback_address, is_loopback_host
from .sources import MAX_MESSAGE_BYTES, SourceError, SourceMessage, SourceOptions

__all__ = [
    "DEFAULT_PASSWORD_ENV",
    "IMAPLocation",
    "IMAPSource",
    "MarkAction",
    "imap_password",
    "open_imap_source",
    "parse_imap_url",
]

#: The variable the IMAP password is read from, unless ``--password-env`` names another.
DEFAULT_PASSWORD_ENV = "MAILER_IMAP_PASSWORD"

_DEFAULT_PORTS = {"imaps": 993, "imap": 143}
_RECONNECTS = 3  # per run: a server that drops us more often than this is not usable now
_MARK_CHUNK = 500  # UIDs per STORE / MOVE command, to keep command lines short


# --------------------------------------------------------------------------------------
# What the user wrote (pure)


@dataclass(frozen=True)
class IMAPLocation:
    """A parsed ``imaps://`` / ``imap://`` URL: where to log in and which mailbox to read."""

    scheme: Literal["imaps", "imap"]
    user: str
    host: str
    port: int
    mailbox: str

    @property
    def address(self) -> str:
        """``host:port`` as errors show it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL as errors show it (it never holds a password)."""
        return f"{self.scheme}://{self.user}@{self.address}/{self.mailbox}"

    def where(self) -> str:
        """The server and mailbox, for the first words of an error."""
        return f"IMAP server {self.address} (user {self.user!r}, mailbox {self.mailbox!r})"


def _has_control(text: str) -> bool:
    return any(ord(character) < 0x20 or ord(character) == 0x7F for character in text)


def parse_imap_url(url: str) -> IMAPLocation:
    """``imaps://user@host[:port]/MAILBOX`` -> :class:`IMAPLocation`.

    The user and mailbox are percent-decoded (``bounces%40acme.example`` for an address
    as user name; a bare ``@`` in the user works too: the last ``@`` ends it). No
    mailbox means ``INBOX``. A password in the URL, query parameters, RFC 5092 ``;``
    parts and control characters are refused (:class:`SourceError`, exit 2).
    """

    def refuse(message: str, hint: str | None = None) -> SourceError:
        return SourceError(message, hint=hint)

    shown = url if not _has_control(url) else repr(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise refuse(f"{shown!r} is not a valid IMAP URL ({exc}).") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise refuse(f"{shown!r} is not an IMAP URL.", "Write imaps://USER@HOST/MAILBOX (or imap:// for STARTTLS).")
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at or not userinfo:
        raise refuse(
            f"the IMAP URL {shown!r} names no user.",
            f"Write {scheme}://USER@HOST/MAILBOX; the password comes from ${DEFAULT_PASSWORD_ENV} (or --password-env).",
        )
    if ":" in userinfo:
        # Never echo what follows the colon: it is most likely a password.
        raise refuse(
            "the IMAP URL holds a password (user:password@host): refusing it, since URLs end up in shell history and process lists.",
            f"Remove it and export {DEFAULT_PASSWORD_ENV} instead (or name another variable with --password-env).",
        )
    if ";" in userinfo:
        raise refuse(f"the IMAP URL {shown!r} asks for an AUTH mechanism; only LOGIN is supported.")
    user = unquote(userinfo, errors="strict")
    try:
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise refuse(f"the IMAP URL {shown!r} has a bad port ({exc}).") from None
    if not host:
        raise refuse(f"the IMAP URL {shown!r} names no host.")
    if parts.query or parts.fragment or ";" in parts.path:
        raise refuse(
            f"the IMAP URL {shown!r} has parts mailer does not use (?query, #fragment or ;UID=).",
            "Write only imaps://USER@HOST[:PORT]/MAILBOX.",
        )
    try:
        mailbox = unquote(parts.path[1:], errors="strict") if parts.path else ""
    except UnicodeDecodeError:
        raise refuse(f"the mailbox name in {shown!r} is not valid UTF-8 once percent-decoded.") from None
    mailbox = mailbox or "INBOX"
    if _has_control(user) or _has_control(mailbox) or _has_control(host):
        raise refuse(f"the IMAP URL {shown} holds control characters.")
    return IMAPLocation(scheme=scheme, user=user, host=host, port=port, mailbox=mailbox)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MarkAction:
    """What happens to a message once the send log holds what it said."""

    kind: Literal["none", "seen", "move"]
    folder: str | None = None

    @classmethod
    def from_options(cls, options: SourceOptions) -> MarkAction:
        """``--move-to FOLDER`` -> move, ``--mark-seen`` -> seen, neither -> none."""
        if options.move_to is not None:
            if options.mark_seen:
                raise SourceError(
                    "--mark-seen and --move-to both given.",
                    hint="Choose one (a message moved by --move-to is flagged \\Seen there too).",
                )
            if not options.move_to.strip() or _has_control(options.move_to):
                raise SourceError(f"--move-to {options.move_to!r} names no usable folder.")
            return cls("move", options.move_to)
        return cls("seen") if options.mark_seen else cls("none")


def imap_password(environ: Mapping[str, str], variable: str | None = None) -> str:
    """The IMAP password from ``variable`` (default ``MAILER_IMAP_PASSWORD``).

    Unset or empty: :class:`SourceError` naming the variable, never a value.
    """
    name = variable or DEFAULT_PASSWORD_ENV
    password = environ.get(name)
    if not password:
        state = "not set" if password is None else "empty"
        raise SourceError(
            f"the IMAP password variable {name} is {state}.",
            hint=f"Export it first: read -rs {name} && export {name} (the password is never written to a file).",
        )
    return password


# --------------------------------------------------------------------------------------
# The --debug trace


class _Trace(logging.Handler):
    """imapclient's protocol log, written as ``imap: ...`` lines, secrets removed."""

    REDACTED = "********"

    def __init__(self, write: Callable[[str], object], password: str) -> None:
        super().__init__(logging.DEBUG)
        self._write = write
        self.muted = False
        forms = {password, repr(password)[1:-1], repr(password.encode("utf-8"))[2:-1]}
        forms |= {form.replace("\\", "\\\\").replace('"', '\\"') for form in list(forms)}
        self._secrets = sorted((form for form in forms if form), key=len, reverse=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.muted:
            return
        try:
            text = record.getMessage()
        except Exception:  # imaplib's own log calls do not always fit logging's format
            text = str(record.msg)
        if text.startswith(("\t", "untagged_responses", "last ")) or " matched " in text[:12]:
            return  # imaplib's parser chatter: no protocol line
        for secret in self._secrets:
            text = text.replace(secret, self.REDACTED)
        if len(text) > 300:
            text = text[:300] + f"... ({len(text)} characters)"
        self._write(f"imap: {text}\n")

    def install(self) -> None:
        logger = logging.getLogger("imapclient")
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)

    def remove(self) -> None:
        logger = logging.getLogger("imapclient")
        logger.removeHandler(self)
        logger.setLevel(logging.NOTSET)


# --------------------------------------------------------------------------------------
# The connection


def _error(location: IMAPLocation, message: str, hint: str | None = None, *, later: bool = False) -> SourceError:
    error = SourceError(f"{location.where()}: {message}", hint=hint)
    if later:
        error.exit_code = ExitCode.TEMPFAIL
    return error


def _reason(exc: BaseException, password: str) -> str:
    text = str(exc) or type(exc).__name__
    if text.startswith("b'") and text.endswith("'"):  # imapclient shows server text as bytes
        text = text[2:-1]
    if password:
        text = text.replace(password, _Trace.REDACTED)
    # Server text is shown to the user: no control characters, no screenful.
    text = "".join(character if character.isprintable() else " " for character in text)
    return text if len(text) <= 200 else text[:200] + "..."


_CONNECTION_LOST = (imaplib.IMAP4.abort, OSError, EOFError)


class _Connection:
    """Connect, secure, log in and select, with the errors a user can act on."""

    def __init__(
        self,
        location: IMAPLocation,
        *,
        password: str,
        password_env: str,
        ssl_context: ssl.SSLContext,
        timeout: float,
        read_only: bool,
        trace: _Trace | None,
    ) -> None:
        self.location = location
        self.password = password
        self.password_env = password_env
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.read_only = read_only
        self.trace = trace

    def open(self) -> tuple[IMAPClient, int]:
        """A logged-in client with the mailbox selected, and the mailbox's UIDVALIDITY."""
        location = self.location
        client = self._connect()
        try:
            _no_delay(client)
            self._secure(client)
            self._login(client)
            try:
                selected = client.select_folder(location.mailbox, readonly=self.read_only)
            except IMAPClientError as exc:
                raise _error(
                    location,
                    f"the mailbox cannot be opened ({_reason(exc, self.password)}).",
                    "Check its name: only INBOX is case-insensitive, and sub-folders use the server's separator (INBOX/Bounces or INBOX.Bounces).",
                ) from None
            validity = selected.get(b"UIDVALIDITY")
            if not isinstance(validity, int):
                raise _error(
                    location, "the server gave no UIDVALIDITY for the mailbox, so its messages have no stable names."
                )
            return client, validity
        except BaseException:
            _close_quietly(client)
            raise

    def _connect(self) -> IMAPClient:
        location = self.location
        implicit = location.scheme == "imaps"
        try:
            return IMAPClient(
                location.host,
                port=location.port,
                ssl=implicit,
                ssl_context=self.ssl_context if implicit else None,
                timeout=self.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise self._certificate_error(exc) from None
        except (ssl.SSLError, *_CONNECTION_LOST, imaplib.IMAP4.error) as exc:
            raise _error(
                location,
                f"cannot connect ({_reason(exc, self.password)}).",
                "Check the host and port (993 for imaps://, 143 for imap://) and that the server is reachable from here.",
                later=False,
            ) from None

    def _certificate_error(self, exc: ssl.SSLCertVerificationError) -> SourceError:
        return _error(
            self.location,
            f"its TLS certificate cannot be verified ({exc.verify_message or exc}).",
            "mailer verifies certificates against the system's trust store; for a private CA, point SSL_CERT_FILE at its certificate.",
        )

    def _secure(self, client: IMAPClient) -> None:
        location = self.location
        if location.scheme == "imaps":
            return
        try:
            offers_starttls = client.has_capability("STARTTLS")
            if offers_starttls:
                client.starttls(self.ssl_context)
                return
        except ssl.SSLCertVerificationError as exc:
            raise self._certificate_error(exc) from None
        except (ssl.SSLError, *_CONNECTION_LOST, IMAPClientError) as exc:
            raise _error(location, f"STARTTLS failed ({_reason(exc, self.password)}).") from None
        try:
            peer = client.socket().getpeername()[0]
        except OSError:
            peer = ""
        if not (is_loopback_host(location.host) and is_loopback_address(peer)):
            raise _error(
                location,
                "the server offers no STARTTLS: refusing to send the password over an unencrypted connection.",
                "Use imaps:// (TLS, port 993), or a server that offers STARTTLS; plain IMAP is allowed only to this machine.",
            )

    def _login(self, client: IMAPClient) -> None:
        location = self.location
        if self.trace is not None:
            self.trace.muted = True
            self.trace._write(f"imap: > LOGIN {location.user} {_Trace.REDACTED}\n")
        try:
            client.login(location.user, self.password)
        except LoginError as exc:
            raise _error(
                location,
                f"the login was refused ({_reason(exc, self.password)}).",
                f"Check the user name in the URL and the password in ${self.password_env}.",
            ) from None
        except UnicodeEncodeError:
            raise _error(
                location,
                "the user name or password holds non-ASCII characters, which IMAP LOGIN cannot send.",
                "Use an ASCII password (an app password, for most providers).",
            ) from None
        except (*_CONNECTION_LOST, IMAPClientError) as exc:
            raise _error(location, f"the connection failed during login ({_reason(exc, self.password)}).") from None
        finally:
            if self.trace is not None:
                self.trace.muted = False


def _no_delay(client: IMAPClient) -> None:
    # imapclient writes a command and its CRLF in two send() calls: with Nagle's
    # algorithm the CRLF can wait for the ACK of the first part, which the server may
    # delay since the command is not complete yet. bench/imap_read.py, batches of 20,
    # one run each under load: 5,621 msg/s with this, 4,019 without.
    try:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _flag_seen(client: IMAPClient, *, uids: list[int]) -> None:
    client.add_flags(uids, [SEEN], silent=True)


def _close_quietly(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


# --------------------------------------------------------------------------------------
# The source


class IMAPSource:
    """The messages of one IMAP mailbox, fetched in bounded batches; see the module doc.

    Use it as a context manager (or call :meth:`close`): it holds a connection.
    """

    def __init__(
        self,
        connection: _Connection,
        *,
        mark: MarkAction,
        since: dt.date | None,
        batch_size: int,
        batch_bytes: int,
        max_message_bytes: int,
    ) -> None:
        self.location = connection.location
        self.mark = mark
        self.since = since
        self.batch_size = max(1, batch_size)
        self.batch_bytes = max(1, batch_bytes)
        self.max_message_bytes = max(1, max_message_bytes)
        self._connection = connection
        self._client: IMAPClient | None = None
        self._validity = 0
        self._reconnects_left = _RECONNECTS
        self.messages_read = 0

    @property
    def name(self) -> str:
        """The URL, as the user wrote it in substance (there is never a password in it)."""
        return self.location.url

    # ------------------------------------------------------------ connection

    def _open(self) -> None:
        client, validity = self._connection.open()
        if self._validity and validity != self._validity:
            _close_quietly(client)
            raise _error(
                self.location,
                f"the mailbox's UIDVALIDITY changed during the run ({self._validity} -> {validity}): its UIDs no longer name the same messages.",
                "Run again: messages already recorded are recognised by the send log.",
                later=True,
            )
        self._client, self._validity = client, validity

    def _with_reconnect(self, what: str, action: Callable[[IMAPClient], Any]) -> Any:
        while True:
            if self._client is None:
                self._open()
            assert self._client is not None
            try:
                return action(self._client)
            except _CONNECTION_LOST as exc:
                _close_quietly(self._client)
                self._client = None
                if self._reconnects_left <= 0:
                    raise _error(
                        self.location,
                        f"the connection was lost while {what} ({_reason(exc, self._connection.password)}), after {self.messages_read} messages.",
                        "Run again later: what was read is recorded, and nothing is counted twice.",
                        later=True,
                    ) from None
                self._reconnects_left -= 1
            except IMAPClientError as exc:
                raise _error(
                    self.location,
                    f"the server refused {what} ({_reason(exc, self._connection.password)}).",
                    later=True,
                ) from None

    def close(self) -> None:
        """Log out (quietly: the work is done whatever the server says)."""
        if self._client is not None:
            _close_quietly(self._client)
            self._client = None
        if self._connection.trace is not None:
            self._connection.trace.remove()

    def __enter__(self) -> IMAPSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading

    def _search(self) -> list[int]:
        criteria: list[Any] = ["SINCE", self.since] if self.since is not None else ["ALL"]
        found = self._with_reconnect("searching the mailbox", lambda client: client.search(criteria))
        return sorted(int(uid) for uid in found)

    def _fetch(self, uids: list[int], items: list[str]) -> dict[int, dict[bytes, Any]]:
        result: dict[int, dict[bytes, Any]] = self._with_reconnect(
            "fetching messages", lambda client: client.fetch(uids, items)
        )
        return result

    def _batches(self, uids: list[int]) -> Iterator[tuple[list[int], bool]]:
        """Groups of UIDs of at most batch_size messages and about batch_bytes bytes.

        A message larger than max_message_bytes comes alone, flagged to be fetched cut
        at that size: a DSN or ARF report puts its machine-readable part before the
        returned message, so the cut keeps what matters, and a hostile 2 GB message
        costs no more memory than a large one.
        """
        for start in range(0, len(uids), self.batch_size):
            chunk = uids[start : start + self.batch_size]
            sizes = self._fetch(chunk, ["RFC822.SIZE"])
            group: list[int] = []
            total = 0
            for uid in chunk:
                if uid not in sizes:
                    continue  # expunged by someone else meanwhile
                size = int(sizes[uid].get(b"RFC822.SIZE", 0))
                if size > self.max_message_bytes:
                    if group:
                        yield group, False
                        group, total = [], 0
                    yield [uid], True
                    continue
                if group and total + size > self.batch_bytes:
                    yield group, False
                    group, total = [], 0
                group.append(uid)
                total += size
            if group:
                yield group, False

    def __iter__(self) -> Iterator[SourceMessage]:
        if self._client is None:
            self._open()
        for group, cut in self._batches(self._search()):
            if cut:
                fetched = self._fetch(group, [f"BODY.PEEK[]<0.{self.max_message_bytes}>"])
                key = b"BODY[]<0>"
            else:
                fetched = self._fetch(group, ["BODY.PEEK[]"])
                key = b"BODY[]"
            for uid in group:
                data = fetched.get(uid)
                raw = data.get(key) if data else None
                if not isinstance(raw, bytes):
                    continue
                self.messages_read += 1
                yield SourceMessage(ref=f"{self._validity}:{uid}", raw=raw, truncated=cut)
            del fetched

    # ------------------------------------------------------------ marking

    def mark_processed(self, refs: Sequence[str]) -> None:
        """Flag or move the messages named by ``refs`` (those of this mailbox), per ``mark``."""
        if self.mark.kind == "none":
            return
        uids = sorted({uid for uid in (self._uid_of(ref) for ref in refs) if uid is not None})
        for start in range(0, len(uids), _MARK_CHUNK):
            chunk = uids[start : start + _MARK_CHUNK]
            if self.mark.kind == "seen":
                self._with_reconnect("flagging messages \\Seen", functools.partial(_flag_seen, uids=chunk))
            else:
                move = functools.partial(self._move, uids=chunk)
                self._with_reconnect(f"moving messages to {self.mark.folder!r}", move)

    def _uid_of(self, ref: str) -> int | None:
        validity, _, uid = ref.partition(":")
        if validity != str(self._validity) or not uid.isdigit():
            return None
        return int(uid)

    def _move(self, client: IMAPClient, uids: list[int]) -> None:
        folder = self.mark.folder
        assert folder is not None
        # Seen first, as a Maildir --move-to does: the folder holds what was handled.
        client.add_flags(uids, [SEEN], silent=True)
        if client.has_capability("MOVE"):
            client.move(uids, folder)
            return
        client.copy(uids, folder)
        client.add_flags(uids, [DELETED], silent=True)
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(uids)
        else:
            client.expunge()


def open_imap_source(
    url: str,
    options: SourceOptions | None = None,
    *,
    password: str | None = None,
    environ: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    batch_size: int = 500,
    batch_bytes: int = 16 * 1024 * 1024,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    timeout: float = 60.0,
    debug: Callable[[str], object] | None = None,
) -> IMAPSource:
    """Connect, log in and open the mailbox of ``url``; the :class:`IMAPSource` of it.

    ``options`` are the command's (``--since``, ``--mark-seen``, ``--move-to``,
    ``--password-env``). The password is ``password`` when given, else read from the
    variable ``options.password_env`` of ``environ`` (the process environment).
    Every problem found here (bad URL, unset variable, unreachable host, TLS, refused
    login, missing mailbox or ``--move-to`` folder) is a :class:`SourceError` (exit 2)
    naming host:port, user and mailbox, never the password. ``ssl_context`` replaces
    the verifying default (tests pass one that trusts their CA). ``debug`` receives the
    protocol trace, line by line (default: ``options.debug``).
    """
    options = options or SourceOptions()
    debug = debug if debug is not None else options.debug
    location = parse_imap_url(url)
    action = MarkAction.from_options(options)
    if action.kind == "move" and action.folder == location.mailbox:
        raise _error(location, f"--move-to {action.folder} names the mailbox being read.", "Name another folder.")
    if password is None:
        password = imap_password(os.environ if environ is None else environ, options.password_env)
    since = options.since
    if isinstance(since, dt.datetime):
        since = since.date()
    trace = _Trace(debug, password) if debug is not None else None
    connection = _Connection(
        location,
        password=password,
        password_env=options.password_env,
        ssl_context=ssl_context or ssl.create_default_context(),
        timeout=timeout,
        read_only=action.kind == "none",
        trace=trace,
    )
    if trace is not None:
        trace.install()
    source = IMAPSource(
        connection,
        mark=action,
        since=since,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        max_message_bytes=max_message_bytes,
    )
    try:
        source._open()
        if action.kind == "move":
            assert source._client is not None and action.folder is not None
            try:
                exists = source._client.folder_exists(action.folder)
            except (IMAPClientError, *_CONNECTION_LOST) as exc:
                raise _error(location, f"cannot list folders ({_reason(exc, password)}).") from None
            if not exists:
                raise _error(
                    location,
                    f"the folder {action.folder!r} (of --move-to) does not exist.",
                    "Create it in your mail client first; mailer does not create folders.",
                )
    except BaseException:
        source.close()
        raise
    return source
