"""Reverse DNS of a stream's source addresses: PTR, forward confirmation, HELO.

Receivers look at the address a connection comes from: Gmail and Outlook.com refuse or
junk mail from an address without a PTR record, or whose PTR name does not resolve
back to it (forward-confirmed reverse DNS, FCrDNS; Gmail's sender guidelines), and many
compare that name with the EHLO name (Postfix's ``reject_unknown_helo_hostname`` and
SpamAssassin's HELO rules). :func:`check_source_address` looks all three up through the
resolver of ``[dns]``; it sends nothing and never raises for a DNS problem.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.name
import dns.resolver
import dns.reversename

from .dns import _lookup

__all__ = ["ReverseDNS", "check_source_address"]


@dataclass(frozen=True)
class ReverseDNS:
    """What DNS says of one source address.

    ``status`` is "ok" (a PTR whose name resolves back to the address and is the
    ``helo``), "warn" (confirmed, but the EHLO name differs or is not set; or DNS did not
    answer) or "fail" (no PTR, or a PTR name that does not resolve back). ``names`` are
    the PTR names, ``confirmed`` those that resolve back to the address.
    """

    address: str
    status: str
    detail: str
    fix: str | None
    names: tuple[str, ...] = ()
    confirmed: tuple[str, ...] = ()


def check_source_address(resolver: dns.resolver.Resolver, address: str, *, helo: str | None) -> ReverseDNS:
    """PTR of ``address``, whether each name resolves back to it, and whether one is ``helo``."""
    ip = ipaddress.ip_address(address)
    reverse = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
    ptr = _lookup(resolver, reverse, "PTR")
    fix_ptr = (
        f"Ask whoever runs {address} (your hosting provider) to set its PTR record to the stream's helo name"
        + (f" ({helo})" if helo else "")
        + ", and give that name an "
        + ("AAAA" if ip.version == 6 else "A")
        + f" record of {address}."
    )
    if ptr.error:
        return ReverseDNS(address, "warn", ptr.error, "Run mailer check again when DNS answers.")
    names = tuple(
        sorted(
            {record.target.to_text(omit_final_dot=True).lower() for record in ptr.records if hasattr(record, "target")}
        )
    )
    if not names:
        why = "NXDOMAIN" if ptr.nxdomain else "no PTR record"
        return ReverseDNS(
            address,
            "fail",
            f"{address} has no PTR record ({reverse}: {why}); Gmail and Outlook.com refuse or junk mail from it.",
            fix_ptr,
        )
    rdtype = "AAAA" if ip.version == 6 else "A"
    confirmed: list[str] = []
    unanswered: list[str] = []
    for name in names:
        forward = _lookup(resolver, name, rdtype)
        if forward.error:
            unanswered.append(forward.error)
            continue
        if any(ipaddress.ip_address(record.to_text()) == ip for record in forward.records):
            confirmed.append(name)
    shown = ", ".join(names)
    if not confirmed:
        if unanswered:
            return ReverseDNS(address, "warn", f"PTR {shown}; {unanswered[0]}", None, names)
        return ReverseDNS(
            address,
            "fail",
            f"PTR {shown}, which does not resolve back to {address} ({rdtype}): not forward-confirmed.",
            f"Give {names[0]} an {rdtype} record of {address}, or point the PTR at a name that has one.",
            names,
        )
    wanted = helo.rstrip(".").lower() if helo else None
    base = f"PTR {shown}; {', '.join(confirmed)} resolves back to {address} (forward-confirmed)"
    if wanted is None:
        return ReverseDNS(
            address,
            "warn",
            base + "; the stream sets no helo, so EHLO says this host's name.",
            f'Set helo = "{confirmed[0]}" in the stream.',
            names,
            tuple(confirmed),
        )
    if wanted not in confirmed:
        return ReverseDNS(
            address,
            "warn",
            base + f"; the stream's helo {helo} is not that name.",
            f'Set helo = "{confirmed[0]}" in the stream, or make the PTR of {address} {helo}.',
            names,
            tuple(confirmed),
        )
    return ReverseDNS(address, "ok", base + ", and it is the stream's helo.", None, names, tuple(confirmed))
