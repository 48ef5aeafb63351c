"""SMTP reply classification (pure): temporary or permanent, closing or not."""

from __future__ import annotations

import smtplib
import socket

from ..core.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["classify_exception", "classify_reply", "closes_connection", "reply_text"]


def classify_reply(code: int, text: str, *, recipient: str | None = None) -> DeliveryError | None:
    """None for a 2xx or 3xx reply; otherwise the error it means.

    4xx is temporary; 5xx is permanent; anything else (a garbled reply) is treated as a
    temporary failure, since the next connection may well behave.
    """
    if 200 <= code < 400:
        return None
    message = f"{code} {text}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(message, smtp_code=code, recipient=recipient)
    return TemporaryDeliveryError(message, smtp_code=code if code > 0 else None, recipient=recipient)


def classify_exception(exc: BaseException, *, recipient: str | None = None) -> TemporaryDeliveryError:
    """The temporary failure behind a dropped connection, a timeout or a socket error."""
    if isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(exc.__context__, TimeoutError):
        return TemporaryDeliveryError("timed out waiting for the relay", recipient=recipient)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TemporaryDeliveryError("the relay closed the connection", recipient=recipient)
    if isinstance(exc, socket.gaierror):
        # The relay's name did not resolve (or the resolver did not answer).
        return TemporaryDeliveryError(f"the host name does not resolve ({exc.strerror or exc})", recipient=recipient)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    # "connection refused", as in "cannot connect to HOST:PORT: connection refused".
    return TemporaryDeliveryError(detail[:1].lower() + detail[1:], recipient=recipient)


def closes_connection(code: int) -> bool:
    """Whether a reply means the relay is closing this connection (RFC 5321: 421)."""
    return code == 421


def reply_text(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw.replace("\n", " ").strip()
