"""`mailer check`: "am I ready to send?" — config, relay, sender DNS and, optionally, the list.

Each check yields a :class:`Check` with ok / warn / fail and, for a warn or fail, what
to do about it. Nothing here sends a message or prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compose.campaign import unsubscribe_warning
from ..compose.contacts import ContactReader, Rejected
from ..compose.seen import SeenAddresses
from ..core.addresses import address_key
from ..core.config import Config, find_config_path, load_config
from ..core.errors import MailerError
from ..smtp.policy import relay_settings_problem, tls_verification_warning

if TYPE_CHECKING:
    import ssl

    import dns.resolver

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``section`` (config, smtp, dns, contacts), ``status`` ok/warn/fail."""

    section: str
    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _from_domain(config: Config) -> str | None:
    if config.message.from_:
        address = parseaddr(config.message.from_)[1]
        if "@" in address:
            return address.rpartition("@")[2]
    return config.dkim.domain if config.dkim else None


def run_checks(
    config_path: str | os.PathLike[str] | None,
    contacts: str | None,
    *,
    resolver: dns.resolver.Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    skip_smtp: bool = False,
) -> Iterator[Check]:
    """Run every check in order; stops early only when the config cannot be read."""
    path, _explicit = find_config_path(config_path)
    try:
        config = load_config(config_path)
    except MailerError as exc:
        yield Check("config", "config file", "fail", str(exc), "Fix the file; `mailer init` writes a valid example.")
        return
    if path is None:
        yield Check(
            "config",
            "config file",
            "warn",
            "no mailer.toml found; using defaults",
            "Create one with `mailer init`, or pass --config / set MAILER_CONFIG.",
        )
    else:
        yield Check("config", "config file", "ok", f"{path}: keys valid")
    smtp = config.smtp
    password = smtp.password()
    relay_problem = relay_settings_problem(smtp, password)
    if relay_problem is not None:
        yield Check("config", "password", "fail", relay_problem.message, relay_problem.hint)
    elif smtp.username:
        yield Check("config", "password", "ok", f"{smtp.password_env} is set")
    tls_warning = tls_verification_warning(smtp)
    if tls_warning is not None:
        yield Check(
            "config",
            "TLS verification",
            "warn",
            tls_warning,
            "Remove tls_verify = false (the default verifies), unless the relay is on a trusted network.",
        )
    unsubscribe = unsubscribe_warning(config.message, config.web)
    if unsubscribe is not None:
        yield Check("config", "unsubscribe", "warn", *unsubscribe)
    elif config.message.kind == "transactional":
        yield Check("config", "unsubscribe", "ok", "transactional stream: no unsubscribe headers expected")
    else:
        what = " and ".join(
            x
            for x, on in (
                ("one-click URL", config.message.list_unsubscribe),
                ("mailto", config.message.list_unsubscribe_mailto),
            )
            if on
        )
        yield Check("config", "unsubscribe", "ok", f"List-Unsubscribe with {what}")

    signer = None
    if config.dkim is not None:
        from ..dkim.signer import DKIMSigner

        try:
            signer = DKIMSigner.load(config.dkim)
        except MailerError as exc:
            yield Check("config", "DKIM key", "fail", str(exc))
        else:
            yield Check("config", "DKIM key", "ok", f"{config.dkim.private_key} ({signer.key_type})")
            for warning in signer.warnings:
                yield Check("config", "DKIM key", "warn", warning)

    from .store import check_send_log

    log_checks = list(check_send_log(config.log))
    yield from log_checks
    log_usable = all(item.status != "fail" for item in log_checks)

    # [smtp] is probed when a campaign can use it: no stream is named like [message]
    # kind (so it is the default route), or a stream names no relay.
    smtp_used = config.stream(config.message.kind) is None or any(s.uses_smtp_section for s in config.streams)
    if not skip_smtp and not smtp_used:
        yield Check("smtp", "connection", "ok", "[smtp] is not used: every stream has relays or is direct")
    elif not skip_smtp and relay_problem is not None:
        yield Check(
            "smtp",
            "connection",
            "fail",
            "not tried: the relay settings are refused (see config/password)",
            "Fix config/password, then run mailer check again.",
        )
    elif not skip_smtp:
        from ..smtp.probe import probe_relay

        probe = probe_relay(smtp, password=password, ssl_context=ssl_context)
        for step in probe.steps:
            yield Check(
                "smtp",
                step.name,
                "ok" if step.ok else "fail",
                step.detail,
                None if step.ok else step.fix or "Check [smtp] host, port and security, and the relay's logs.",
            )
        if probe.ok:
            wanted = ("PIPELINING", "SIZE", "SMTPUTF8", "CHUNKING", "8BITMIME")
            offered = [name for name in wanted if name in probe.extensions]
            missing = [name for name in wanted if name not in probe.extensions]
            detail = "offers " + (", ".join(offered) or "none of " + ", ".join(wanted))
            if missing:
                detail += f"; not {', '.join(missing)}"
            yield Check(
                "smtp",
                "extensions",
                "ok" if "PIPELINING" in offered else "warn",
                detail,
                None if "PIPELINING" in offered else "Without PIPELINING each message costs more round trips.",
            )

    if not skip_smtp:
        yield from _probe_named_relays(config, ssl_context=ssl_context)

    from .dns import check_sender_domain, make_resolver

    resolver = resolver or make_resolver(config.dns)
    yield from _check_streams(config, resolver=resolver)
    domain = _from_domain(config)
    if domain is None:
        yield Check(
            "dns",
            "sender domain",
            "warn",
            "no [message] from in the config, so no domain to check",
            'Set [message] from = "Name <you@your-domain>".',
        )
    else:
        for result in check_sender_domain(
            domain,
            resolver=resolver,
            dkim_selector=config.dkim.selector if config.dkim else None,
            dkim_signer_or_public_key_matcher=signer,
            dkim_domain=config.dkim.domain if config.dkim else None,
            bulk=config.message.kind != "transactional",
        ):
            yield Check("dns", f"{result.name} ({domain})", str(result.status), result.detail, result.fix)

    if contacts is not None:
        yield from _check_contacts(contacts, config, resolver=resolver, on_progress=on_progress, log_usable=log_usable)


def _probe_named_relays(config: Config, *, ssl_context: ssl.SSLContext | None) -> Iterator[Check]:
    """Each ``[relays.NAME]``: its login settings, then connect, TLS, AUTH (sends nothing)."""
    from ..smtp.probe import probe_relay

    for relay in config.relays:
        section = f"relays.{relay.name}"
        password = relay.smtp.password()
        problem = relay_settings_problem(relay.smtp, password, section=section)
        if problem is not None:
            yield Check("smtp", f"relay {relay.name}", "fail", problem.message, problem.hint)
            continue
        probe = probe_relay(relay.smtp, password=password, ssl_context=ssl_context)
        for step in probe.steps:
            yield Check(
                "smtp",
                f"relay {relay.name}: {step.name}",
                "ok" if step.ok else "fail",
                step.detail,
                None if step.ok else step.fix or f"Check [{section}] host, port and security, and the relay's logs.",
            )


def _check_streams(config: Config, *, resolver: dns.resolver.Resolver) -> Iterator[Check]:
    """Per stream and source address: its PTR, forward confirmation, and the stream's helo."""
    from .reverse import check_source_address

    for stream in config.streams:
        if not stream.source_addresses:
            how = "direct delivery" if stream.direct else "its relays"
            yield Check(
                "streams",
                stream.name,
                "ok",
                f"no source_addresses: connections to {how} leave from the address the system picks",
            )
            continue
        for address in stream.source_addresses:
            found = check_source_address(resolver, address, helo=stream.helo)
            yield Check("streams", f"{stream.name} {address}", found.status, found.detail, found.fix)


def _check_contacts(
    contacts: str,
    config: Config,
    *,
    resolver: dns.resolver.Resolver,
    on_progress: Callable[[int, int], None] | None,
    log_usable: bool,
) -> Iterator[Check]:
    from .dns import check_recipient_domains

    invalid: list[str] = []
    invalid_count = duplicates = rows = 0
    seen = SeenAddresses()
    domains: dict[str, int] = {}
    suppressed = 0
    log = None
    # The suppression list is asked only of a send log that the log check could read.
    if log_usable and (config.log.url is not None or Path(config.log.path).exists()):
        from ..store import open_store

        log = open_store(config.log, create=False)
    batch: list[str] = []

    def count_suppressed() -> int:
        found = sum(log.suppressed(batch)) if log is not None and batch else 0
        batch.clear()
        return found

    try:
        with ContactReader(contacts) as reader:
            for item in reader:
                if isinstance(item, Rejected):
                    if item.kind in ("invalid", "fields"):
                        invalid_count += 1
                        if len(invalid) < 5:
                            invalid.append(f"line {item.line}: {item.reason}")
                    continue
                rows += 1
                if seen.add(address_key(item.envelope).encode("utf-8", "surrogatepass"), item.line) is not None:
                    duplicates += 1
                    continue
                domain = item.envelope.rpartition("@")[2].lower()
                domains[domain] = domains.get(domain, 0) + 1
                batch.append(item.envelope)
                if len(batch) >= 500:
                    suppressed += count_suppressed()
        suppressed += count_suppressed()
    finally:
        if log is not None:
            log.close()
    name = reader.display_name
    yield Check(
        "contacts",
        "addresses",
        "fail" if invalid_count else "ok",
        f"{rows} valid rows; {invalid_count} invalid" + (": " + "; ".join(invalid) if invalid else ""),
        "Fix or remove the invalid rows (they are skipped and reported by send)." if invalid_count else None,
    )
    yield Check(
        "contacts",
        "duplicates",
        "warn" if duplicates else "ok",
        f"{duplicates} duplicate addresses",
        "Duplicates are mailed once; remove them from the file to keep it clean." if duplicates else None,
    )
    if log_usable:
        yield Check("contacts", "suppressed", "ok", f"{suppressed} addresses on the suppression list (send skips them)")
    else:
        yield Check(
            "contacts",
            "suppressed",
            "warn",
            "not checked: the send log cannot be read (see log/send log)",
            "Fix the send log, then run mailer check again.",
        )
    verdicts = check_recipient_domains(domains, resolver=resolver, on_progress=on_progress)
    dead = [v for v in verdicts.values() if v.status == "fail"]
    unknown = [v for v in verdicts.values() if v.status == "warn"]
    dead_recipients = sum(domains.get(v.domain, 0) for v in dead)
    detail = f"{len(verdicts)} domains looked up; {len(dead)} cannot receive mail ({dead_recipients} recipients)"
    if dead:
        detail += ": " + "; ".join(f"{v.domain} ({v.detail})" for v in dead[:5])
    if unknown:
        detail += f"; {len(unknown)} did not answer"
    status = "fail" if dead else ("warn" if unknown else "ok")
    yield Check(
        "contacts",
        f"recipient domains ({name})",
        status,
        detail,
        "Remove these addresses: mail to them bounces, and bounces hurt your reputation." if dead else None,
    )
