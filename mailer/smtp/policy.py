"""Relay settings that must be refused before any connection: passwords in clear, TLS choices."""

from __future__ import annotations

import ipaddress
import ssl

from ..core.config import SMTPConfig
from ..core.errors import ConnectionSetupError, ExitCode

__all__ = [
    "TLS_VERIFY_DISABLED_WARNING",
    "check_relay_settings",
    "is_loopback_host",
    "make_ssl_context",
    "setup_error",
    "tls_verification_warning",
]


#: What the CLI prints (on stderr) when ``[smtp] tls_verify = false``.
TLS_VERIFY_DISABLED_WARNING = (
    "TLS certificate verification is OFF ([smtp] tls_verify = false): the connection is "
    "encrypted, but anyone on the network path can impersonate the relay and read the "
    "password and the messages. Use this only for a relay you reach over a trusted network."
)


# --------------------------------------------------------------------------------------
# Relay settings (pure)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine: 127.0.0.0/8, ::1 or ``localhost``.

    Names are not resolved: a DNS answer must not be able to turn a remote relay into
    a "local" one that gets the password in clear text.
    """
    name = host.strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def setup_error(message: str, hint: str | None = None) -> ConnectionSetupError:
    # The relay cannot be used as configured: the user must fix something before a
    # re-run can help, so this is a usage error, not "try again later".
    error = ConnectionSetupError(message, hint=hint)
    error.exit_code = ExitCode.USAGE
    return error


def check_relay_settings(smtp: SMTPConfig, password: str | None) -> None:
    """Refuse settings that must not be used, before any connection is made.

    Raises :class:`ConnectionSetupError` (exit code USAGE) when a username is set but
    no password is available, or when the password would go over an unencrypted
    connection to a host that is not this machine.
    """
    if smtp.security not in ("starttls", "tls", "none"):
        raise setup_error(f"unknown [smtp] security {smtp.security!r}.", 'Use "starttls", "tls" or "none".')
    if not smtp.username:
        return
    if not password:
        where = f"the environment variable {smtp.password_env}" if smtp.password_env else "[smtp] password_env"
        raise setup_error(
            f"[smtp] username is set to {smtp.username!r} but no password is available.",
            f"Set {where} to the relay password (or remove the username if the relay needs no login).",
        )
    if smtp.security == "none" and not is_loopback_host(smtp.host):
        raise setup_error(
            f'refusing to send the password to {smtp.host} over an unencrypted connection ([smtp] security = "none").',
            'Use security = "starttls" (port 587) or "tls" (port 465); '
            '"none" with a login is allowed only for a relay on this machine.',
        )


def make_ssl_context(smtp: SMTPConfig) -> ssl.SSLContext:
    """The TLS context for the relay: certificates verified, unless ``tls_verify`` is off."""
    context = ssl.create_default_context()
    if not smtp.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_verification_warning(smtp: SMTPConfig) -> str | None:
    """The warning the CLI must show for these settings, or None."""
    if not smtp.tls_verify and smtp.security in ("starttls", "tls"):
        return TLS_VERIFY_DISABLED_WARNING
    return None
