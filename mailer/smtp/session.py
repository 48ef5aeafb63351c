"""Opening an SMTP session: connect, EHLO, STARTTLS or implicit TLS, AUTH.

The password is used only for AUTH. It never appears in an exception message or a
probe step: texts that come back from the relay during login are scrubbed, and
smtplib's debug output (which prints the AUTH exchange) is never enabled; ``--debug``
shows the conversation through :mod:`mailer.smtp.trace`, which redacts AUTH.
"""

from __future__ import annotations

import base64
import functools
import itertools
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

from ..core.config import SMTPConfig
from ..core.errors import ConnectionSetupError, TemporaryDeliveryError
from .policy import is_loopback_address, make_ssl_context, setup_error
from .replies import classify_exception, reply_text
from .trace import Trace, TracedSMTP, TracedSMTPSSL

__all__ = ["Setup", "SourceAddresses", "StepNote"]

#: Called as each setup step ends: ``(step name, ok, detail)``; :func:`probe_relay` records them.
StepNote = Callable[[str, bool, str], None]


def _no_note(name: str, ok: bool, detail: str) -> None:
    pass


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    # smtplib would do this (a reverse DNS lookup) on every connection. RFC 5321 wants
    # a fully qualified name in EHLO, or else an address literal.
    fqdn = socket.getfqdn()
    if "." in fqdn:
        return fqdn
    try:
        return f"[{socket.gethostbyname(socket.gethostname())}]"
    except OSError:
        return "[127.0.0.1]"


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text


def _secret_forms(username: str | None, password: str | None) -> tuple[str, ...]:
    """The password and the encodings of it that AUTH puts on the wire."""
    if not password:
        return ()
    forms = [password, base64.b64encode(password.encode()).decode()]
    if username:
        forms.append(base64.b64encode(f"\0{username}\0{password}".encode()).decode())
    return tuple(forms)


class SourceAddresses:
    """The local addresses a stream's connections leave from, handed out in turn, so
    that the connections spread evenly over them (thread-safe; empty: the system picks)."""

    def __init__(self, addresses: Sequence[str] = ()) -> None:
        self.addresses = tuple(addresses)
        self._turn = itertools.cycle(self.addresses)
        self._lock = threading.Lock()

    def take(self) -> str | None:
        """The next address, or None when there are none."""
        if not self.addresses:
            return None
        with self._lock:
            return next(self._turn)


class Setup:
    """Everything needed to open a connection, computed once per run.

    ``peer_is_local`` decides, from the address the socket is connected to, whether a
    password may go over an unencrypted connection (tests replace it to play a relay
    that is not on this machine).
    """

    peer_is_local: Callable[[str], bool] = staticmethod(is_loopback_address)

    def __init__(
        self,
        smtp: SMTPConfig,
        password: str | None,
        ssl_context: ssl.SSLContext | None,
        *,
        trace: Callable[[str], None] | None = None,
        helo: str | None = None,
        sources: SourceAddresses | None = None,
    ) -> None:
        """``trace``: where ``--debug`` writes the SMTP conversation (None: nowhere);
        ``helo``: the EHLO name (a stream's ``helo``; default the relay's, else this
        host's name); ``sources``: the local addresses to bind connections to, in turn."""
        self.trace = trace
        self._traced = 0  # connections traced so far, to number them
        self.smtp = smtp
        self.host = smtp.host
        self.port = smtp.effective_port
        self.where = f"{smtp.host}:{self.port}"
        self.password = password
        self.secrets = _secret_forms(smtp.username, password)
        self.helo = helo or smtp.helo or _local_hostname()
        self.sources = sources if sources is not None else SourceAddresses()
        self.context: ssl.SSLContext | None = None
        if smtp.security != "none":
            self.context = ssl_context if ssl_context is not None else make_ssl_context(smtp)

    def _traced_client(self) -> smtplib.SMTP:
        smtp = self.smtp
        assert self.trace is not None
        self._traced += 1  # the pool's threads may race here: a repeated number is harmless
        trace = Trace(self.trace, number=self._traced, secrets=self.secrets)
        trace.note(f"connecting to {self.where} (security {smtp.security})")
        client: TracedSMTP | TracedSMTPSSL
        if smtp.security == "tls":
            client = TracedSMTPSSL(local_hostname=self.helo, timeout=smtp.timeout, context=self.context)
        else:
            client = TracedSMTP(local_hostname=self.helo, timeout=smtp.timeout)
        client.mailer_trace = trace
        return client

    def tls_error(self, exc: ssl.SSLError) -> ConnectionSetupError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or exc.reason or str(exc)
            return setup_error(
                f"the TLS certificate of {self.where} could not be verified: {reason}.",
                "Fix the relay's certificate (or the host name in [smtp] host, which must match it); "
                "set [smtp] tls_verify = false only for a relay on a trusted network.",
            )
        hint = (
            'Port 465 usually wants security = "tls" and port 587 security = "starttls".'
            if self.smtp.security in ("tls", "starttls")
            else None
        )
        return setup_error(f"TLS with {self.where} failed: {exc.reason or exc}.", hint)

    def open(self, step: StepNote | None = None) -> smtplib.SMTP:
        """Connect, EHLO, (STARTTLS, EHLO), AUTH. Returns the ready client.

        Raises TemporaryDeliveryError for what may pass (refused, timeout, 4xx) and
        ConnectionSetupError (USAGE) for what will not (TLS, login, missing STARTTLS).
        ``step`` is called as each step ends, for :func:`probe_relay`.
        """
        note = step or _no_note
        smtp = self.smtp
        client: smtplib.SMTP
        source: str | None = None
        try:
            if self.trace is None:
                if smtp.security == "tls":
                    client = smtplib.SMTP_SSL(local_hostname=self.helo, timeout=smtp.timeout, context=self.context)
                else:
                    client = smtplib.SMTP(local_hostname=self.helo, timeout=smtp.timeout)
            else:
                client = self._traced_client()
            # smtplib takes the TLS server name (for certificate checks) from the host
            # given to the constructor, which would also connect before we can catch
            # a TLS error apart from a refused connection; so set it here (smtplib's
            # private attribute, which typeshed does not declare, hence setattr).
            setattr(client, "_host", self.host)  # noqa: B010
            source = self.sources.take()
            if source is not None:
                # smtplib binds the socket to (address, port) before connecting.
                client.source_address = (source, 0)
            code, greeting = client.connect(self.host, self.port)
        except ssl.SSLError as exc:
            note("connect", True, f"connected to {self.where}")
            note("tls", False, self.tls_error(exc).message)
            raise self.tls_error(exc) from None
        except OSError as exc:
            error = classify_exception(exc)
            origin = f" from {source}" if source is not None else ""
            error.message = f"cannot connect to {self.where}{origin}: {error.message}"
            note("connect", False, error.message)
            raise error from None
        try:
            return self._greet(client, code, greeting, note)
        except BaseException:
            client.close()
            raise

    def _greet(self, client: smtplib.SMTP, code: int, greeting: bytes, note: StepNote) -> smtplib.SMTP:
        smtp = self.smtp
        text = _scrub(reply_text(greeting), self.secrets)
        if code != 220:
            note("connect", False, f"{self.where} refused the session: {code} {text}")
            if 500 <= code < 600:
                raise setup_error(f"{self.where} refused the session: {code} {text}.")
            raise TemporaryDeliveryError(f"{self.where} refused the session: {code} {text}", smtp_code=code)
        if smtp.security == "tls":
            version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else None
            note("connect", True, f"connected to {self.where} with TLS ({version}): {code} {text}")
        else:
            note("connect", True, f"connected to {self.where}: {code} {text}")
        try:
            self._ehlo(client, note)
            if smtp.security == "starttls":
                if not client.has_extn("starttls"):
                    message = f"{self.where} does not offer STARTTLS."
                    note("starttls", False, message)
                    raise setup_error(
                        message,
                        'If it speaks TLS from the start (port 465), use security = "tls"; '
                        'use "none" only for a relay on this machine.',
                    )
                try:
                    client.starttls(context=self.context)
                except ssl.SSLError as exc:
                    note("starttls", False, self.tls_error(exc).message)
                    raise self.tls_error(exc) from None
                except smtplib.SMTPResponseException as exc:
                    reply = _scrub(reply_text(exc.smtp_error), self.secrets)
                    note("starttls", False, f"STARTTLS refused: {exc.smtp_code} {reply}")
                    if 400 <= exc.smtp_code < 500:
                        raise TemporaryDeliveryError(
                            f"STARTTLS refused by {self.where}: {exc.smtp_code} {reply}", smtp_code=exc.smtp_code
                        ) from None
                    raise setup_error(f"{self.where} refused STARTTLS: {exc.smtp_code} {reply}.") from None
                tls = client.sock
                assert isinstance(tls, ssl.SSLSocket)  # starttls() succeeded
                note(
                    "starttls",
                    True,
                    f"TLS {tls.version()}, certificate "
                    + ("verified" if tls.context.verify_mode != ssl.CERT_NONE else "NOT verified"),
                )
                self._ehlo(client, note)
            if smtp.username:
                self._login(client, note)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            if isinstance(exc, ssl.SSLError):
                raise self.tls_error(exc) from None
            error = classify_exception(exc)
            error.message = f"{self.where}: {error.message} during connection setup"
            note("setup", False, error.message)
            raise error from None
        return client

    def _ehlo(self, client: smtplib.SMTP, note: StepNote) -> None:
        code, reply = client.ehlo()
        if code == 250:
            note("ehlo", True, "extensions: " + (", ".join(sorted(k.upper() for k in client.esmtp_features)) or "none"))
            return
        text = _scrub(reply_text(reply), self.secrets)
        if self.smtp.security == "starttls" or self.smtp.username or code == 421 or code < 0:
            # Without ESMTP there is no STARTTLS and no AUTH; 421 means "go away".
            note("ehlo", False, f"EHLO refused: {code} {text}")
            if 400 <= code < 500 or code < 0:
                raise TemporaryDeliveryError(f"{self.where} refused EHLO: {code} {text}", smtp_code=code)
            raise setup_error(f"{self.where} refused EHLO: {code} {text}.")
        code, reply = client.helo()
        text = _scrub(reply_text(reply), self.secrets)
        if code != 250:
            note("helo", False, f"HELO refused: {code} {text}")
            if 500 <= code < 600:
                raise setup_error(f"{self.where} refused HELO: {code} {text}.")
            raise TemporaryDeliveryError(f"{self.where} refused HELO: {code} {text}", smtp_code=code)
        note("helo", True, "the relay speaks plain SMTP (no extensions)")

    def _refuse_clear_text_to_remote(self, client: smtplib.SMTP, note: StepNote) -> None:
        """No AUTH over a connection without TLS unless its peer is this machine.

        The configured name passed :func:`check_relay_settings` (``localhost``, say), but
        a name is resolved: only the address actually connected to is proof.
        """
        sock = client.sock
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            peer = "an unknown address"
        if sock.family in (socket.AF_INET, socket.AF_INET6) and self.peer_is_local(peer):
            return
        message = (
            f"refusing to send the password to {self.where} over an unencrypted connection: "
            f"it is connected to {peer}, which is not this machine."
        )
        note("auth", False, message)
        raise setup_error(
            message,
            'Use security = "starttls" (port 587) or "tls" (port 465); "none" with a login is allowed only '
            "for a relay on this machine (127.0.0.1, ::1). Check what the name in [smtp] host resolves to.",
        )

    def _login(self, client: smtplib.SMTP, note: StepNote) -> None:
        smtp = self.smtp
        username, password = smtp.username, self.password
        if not username or password is None:
            # check_relay_settings() refuses a username without a password before any connection.
            raise setup_error(f"[smtp] username is set to {username!r} but no password is available.")
        self._refuse_clear_text_to_remote(client, note)
        try:
            client.login(username, password)
        except smtplib.SMTPAuthenticationError as exc:
            reply = _scrub(reply_text(exc.smtp_error), self.secrets)
            note("auth", False, f"login as {smtp.username!r} rejected: {exc.smtp_code} {reply}")
            if 400 <= exc.smtp_code < 500:
                raise TemporaryDeliveryError(
                    f"{self.where} could not log in now: {exc.smtp_code} {reply}", smtp_code=exc.smtp_code
                ) from None
            where = f"${smtp.password_env}" if smtp.password_env else "the password"
            raise setup_error(
                f"{self.where} rejected the login as {smtp.username!r}: {exc.smtp_code} {reply}.",
                f"Check [smtp] username and {where}.",
            ) from None
        except smtplib.SMTPNotSupportedError:
            note("auth", False, "the relay does not offer AUTH on this connection")
            raise setup_error(
                f"{self.where} does not offer AUTH (login) on this connection.",
                "Remove [smtp] username if the relay needs no login; some relays offer AUTH only after STARTTLS.",
            ) from None
        except smtplib.SMTPServerDisconnected:
            raise
        except smtplib.SMTPException:
            offered = client.esmtp_features.get("auth", "").strip() or "none"
            note("auth", False, f"no usable AUTH mechanism (offered: {offered})")
            raise setup_error(
                f"{self.where} offers no AUTH mechanism mailer can use (offered: {offered}; "
                "supported: PLAIN, LOGIN, CRAM-MD5)."
            ) from None
        finally:
            # smtplib keeps the credentials on the object; drop them once used.
            client.user = client.password = ""
        note("auth", True, f"logged in as {smtp.username!r}")
