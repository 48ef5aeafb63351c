"""The relay probe of ``mailer check``: connect, TLS, login; send nothing."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, field, replace

from ..core.config import SMTPConfig
from ..core.errors import ConnectionSetupError, TemporaryDeliveryError
from .policy import relay_settings_problem
from .session import Setup

__all__ = ["ProbeStep", "RelayProbe", "probe_relay"]


# --------------------------------------------------------------------------------------
# Connection setup (shared by deliver and probe_relay)


@dataclass(frozen=True)
class ProbeStep:
    """One step of :func:`probe_relay`: what was tried, whether it worked, and details.

    ``fix`` is the hint a send would give for the same failure (None: none known).
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class RelayProbe:
    """What :func:`probe_relay` found. ``ok`` is True when every step worked."""

    host: str
    port: int
    security: str
    steps: list[ProbeStep] = field(default_factory=list)
    extensions: dict[str, str] = field(default_factory=dict)  # EHLO keyword (upper) -> parameters
    auth_mechanisms: list[str] = field(default_factory=list)
    tls_version: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


# --------------------------------------------------------------------------------------
# mailer check


def probe_relay(smtp: SMTPConfig, *, password: str | None, ssl_context: ssl.SSLContext | None = None) -> RelayProbe:
    """Connect, EHLO, STARTTLS or TLS (verified), AUTH if configured; send no message.

    Never raises for a relay problem: each step is recorded with ``ok`` and a detail,
    and the probe stops at the first failed step.
    """
    probe = RelayProbe(host=smtp.host, port=smtp.effective_port, security=smtp.security)

    def note(name: str, ok: bool, detail: str) -> None:
        probe.steps.append(ProbeStep(name, ok, detail))

    problem = relay_settings_problem(smtp, password)
    if problem is not None:
        probe.steps.append(ProbeStep("settings", False, problem.message, problem.hint))
        return probe
    setup = Setup(smtp, password, ssl_context)
    try:
        client = setup.open(note)
    except (ConnectionSetupError, TemporaryDeliveryError) as exc:
        if not probe.steps or probe.steps[-1].ok:
            note("setup", False, exc.message)
        # The hint a send prints for this error (tls_verify for a certificate, say).
        probe.steps[-1] = replace(probe.steps[-1], fix=exc.hint)
        return probe
    try:
        probe.extensions = {k.upper(): v for k, v in client.esmtp_features.items()}
        probe.auth_mechanisms = client.esmtp_features.get("auth", "").upper().split()
        if isinstance(client.sock, ssl.SSLSocket):
            probe.tls_version = client.sock.version()
        if not smtp.username:
            note("auth", True, "no login configured ([smtp] username is not set)")
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
    return probe
