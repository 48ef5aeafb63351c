"""Relay settings that must be refused before any connection: passwords in clear, TLS choices."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from ..core.config import SMTPConfig
from ..core.errors import ConnectionSetupError, ExitCode

__all__ = [
    "TLS_VERIFY_DISABLED_WARNING",
    "RelayProblem",
    "check_relay_settings",
    "is_loopback_address",
    "is_loopback_host",
    "make_ssl_context",
    "relay_settings_problem",
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


def is_loopback_address(address: str) -> bool:
    """Whether ``address`` (a socket's peer address, as ``getpeername()[0]`` gives it) is
    this machine: 127.0.0.0/8, ::1, or 127.x mapped into IPv6 (``::ffff:127.0.0.1``).

    This, not the configured name, decides whether a password may go in clear text: a
    name such as ``localhost.`` goes to DNS, and any answer can point it elsewhere.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def setup_error(message: str, hint: str | None = None) -> ConnectionSetupError:
    # The relay cannot be used as configured: the user must fix something before a
    # re-run can help, so this is a usage error, not "try again later".
    error = ConnectionSetupError(message, hint=hint)
    error.exit_code = ExitCode.USAGE
    return error


@dataclass(frozen=True)
class RelayProblem:
    """A relay setting that must not be used: what is wrong and how to fix it."""

    message: str
    hint: str


def relay_settings_problem(smtp: SMTPConfig, password: str | None, *, section: str = "smtp") -> RelayProblem | None:
    """The one rule for the relay's login settings, or None when they may be used.

    ``send`` refuses what it finds (:func:`check_relay_settings`) and ``mailer check``
    shows it, with the same words. Wrong: a username without ``password_env``, a
    ``password_env`` whose variable is unset or empty, and a password that would go
    over an unencrypted connection to a host that is not this machine. ``section`` is
    the table the settings come from (``relays.ses``), as the messages name it.
    """
    if smtp.security not in ("starttls", "tls", "none"):
        return RelayProblem(f"unknown [{section}] security {smtp.security!r}.", 'Use "starttls", "tls" or "none".')
    if not smtp.username:
        return None
    variable = smtp.password_env
    if not password and not variable:
        return RelayProblem(
            f"[{section}] username is set to {smtp.username!r} but password_env is not.",
            'Set password_env = "MAILER_SMTP_PASSWORD" (the variable\'s NAME, never the password) and export '
            "that variable, or remove the username if the relay needs no login.",
        )
    if not password:
        state = "not set" if password is None else "empty"
        return RelayProblem(
            f"the environment variable {variable} (named by [{section}] password_env) is {state}.",
            f"Export it first: read -rs {variable} && export {variable} (the password is never stored in a file).",
        )
    if smtp.security == "none" and not is_loopback_host(smtp.host):
        return RelayProblem(
            f'refusing to send the password to {smtp.host} over an unencrypted connection ([{section}] security = "none").',
            'Use security = "starttls" (port 587) or "tls" (port 465); '
            '"none" with a login is allowed only for a relay on this machine.',
        )
    return None


def check_relay_settings(smtp: SMTPConfig, password: str | None, *, section: str = "smtp") -> None:
    """Refuse settings that must not be used, before any connection is made.

    Raises :class:`ConnectionSetupError` (exit code USAGE) for what
    :func:`relay_settings_problem` finds.
    """
    problem = relay_settings_problem(smtp, password, section=section)
    if problem is not None:
        raise setup_error(problem.message, problem.hint)


def make_ssl_context(smtp: SMTPConfig) -> ssl.SSLContext:
    """The TLS context for the relay: certificates verified, unless ``tls_verify`` is off."""
    context = ssl.create_default_context()
    if not smtp.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_verification_warning(smtp: SMTPConfig, *, section: str = "smtp") -> str | None:
    """The warning the CLI must show for these settings, or None (``section``: the table
    they come from, ``relays.NAME`` for a named relay)."""
    if not smtp.tls_verify and smtp.security in ("starttls", "tls"):
        return TLS_VERIFY_DISABLED_WARNING.replace("[smtp]", f"[{section}]")
    return None
