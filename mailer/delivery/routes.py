"""Which way a campaign's mail leaves: the stream, its relays, source addresses, HELO, envelope sender.

:func:`select_route` applies the one rule of PRODUCT.md: ``--stream NAME``; else the
stream named like ``[message] kind`` when there is one; else the ``[smtp]`` relay. A
stream that names no relay (and is not direct) also uses ``[smtp]``. The result is a
:class:`Route`, which the send, the dry run (envelope sender, ETA) and ``mailer check``
share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import Config, RelayConfig, SMTPConfig
from ..core.errors import UsageError

__all__ = ["SMTP_RELAY_NAME", "Relay", "Route", "relays_of", "select_route"]

#: How the ``[smtp]`` relay is named in messages and in the engine.
SMTP_RELAY_NAME = "smtp"


@dataclass(frozen=True)
class Relay:
    """One relay as the delivery engine uses it. ``rate`` is its own limit in messages
    per second (None: none beyond the campaign's), ``connections`` its pool (None: the
    run's ``[send] connections``). The password never shows in a repr."""

    name: str
    smtp: SMTPConfig
    password: str | None = field(default=None, repr=False)
    weight: float = 1.0
    rate: float | None = None
    connections: int | None = None

    @property
    def where(self) -> str:
        return f"{self.smtp.host}:{self.smtp.effective_port}"

    @property
    def section(self) -> str:
        """The config table it comes from, as messages name it: ``smtp`` or ``relays.NAME``."""
        return SMTP_RELAY_NAME if self.name == SMTP_RELAY_NAME else f"relays.{self.name}"


@dataclass(frozen=True)
class Route:
    """The way out of one campaign. ``stream`` is None when no stream was selected (the
    ``[smtp]`` relay); ``chosen_by`` says why this one (for the prompt and errors)."""

    stream: str | None
    relays: tuple[RelayConfig, ...]
    direct: bool = False
    source_addresses: tuple[str, ...] = ()
    helo: str | None = None
    return_path: str | None = None
    chosen_by: str = "[smtp]"

    @property
    def verp(self) -> bool:
        return self.return_path is not None and "{token}" in self.return_path

    def describe(self) -> str:
        """``stream 'marketing' (relays ses, backup)`` or ``smtp.example.com:587 (starttls)``."""
        if self.direct:
            return f"stream {self.stream!r} (direct delivery to the recipients' MX servers)"
        if self.stream is None:
            smtp = self.relays[0].smtp
            return f"{smtp.host}:{smtp.effective_port} ({smtp.security})"
        shown = ", ".join(
            f"{relay.smtp.host}:{relay.smtp.effective_port}"
            if relay.name == SMTP_RELAY_NAME and len(self.relays) == 1
            else relay.name
            for relay in self.relays
        )
        return f"stream {self.stream!r} (relay{'s' if len(self.relays) > 1 else ''} {shown})"


def _smtp_relay(config: Config) -> RelayConfig:
    return RelayConfig(name=SMTP_RELAY_NAME, smtp=config.smtp)


def select_route(config: Config, stream: str | None = None) -> Route:
    """The route of a campaign: ``stream`` (``--stream``), else the stream named like
    ``[message] kind``, else ``[smtp]``. An unknown name is a :class:`UsageError`
    (exit 2) that lists the streams that exist."""
    chosen_by = "--stream"
    if stream is None:
        if config.stream(config.message.kind) is None:
            return Route(stream=None, relays=(_smtp_relay(config),))
        stream, chosen_by = config.message.kind, "[message] kind"
    found = config.stream(stream)
    if found is None:
        names = [s.name for s in config.streams]
        where = str(config.path) if config.path else "the config"
        raise UsageError(
            f"--stream {stream!r}: no such stream in {where}"
            + (f"; the streams defined are: {', '.join(names)}." if names else "; it defines no [streams.NAME]."),
            hint="Name one of them, or add a [streams.NAME] table (see README, Streams and relays)."
            if names
            else "Add a [streams.NAME] table, or leave out --stream to send through [smtp].",
        )
    relays = (
        tuple(relay for name in found.relays if (relay := config.relay(name)) is not None)
        if found.relays
        else ((_smtp_relay(config),) if not found.direct else ())
    )
    return Route(
        stream=found.name,
        relays=relays,
        direct=found.direct,
        source_addresses=found.source_addresses,
        helo=found.helo,
        return_path=found.return_path,
        chosen_by=chosen_by,
    )


def relays_of(route: Route, *, passwords: dict[str, str | None]) -> list[Relay]:
    """The engine's :class:`Relay` list of a route, with each relay's password."""
    return [
        Relay(
            name=relay.name,
            smtp=relay.smtp,
            password=passwords.get(relay.name),
            weight=relay.weight,
            rate=relay.rate_per_second,
            connections=relay.connections,
        )
        for relay in route.relays
    ]
