"""Where a recipient domain's mail goes (RFC 5321 section 5.1, RFC 7505), for direct delivery.

:class:`MXResolver` answers "which hosts, in which order" with dnspython's asyncio
resolver built from ``[dns]`` (the same nameservers, port and timeout as
``mailer check``), so that thousands of lookups can wait at once without a thread each.

* MX records by preference; among equal preferences the order is random on every call
  (RFC 5321 5.1 asks senders to spread their load), from a random source the caller may
  pass in (tests pass a seeded one).
* No MX record: the domain's own A/AAAA addresses are its mail exchanger (the
  "implicit MX").
* A null MX (RFC 7505: one record, preference 0, exchange "."), NXDOMAIN, or neither MX
  nor A/AAAA: :class:`NoMailRouteError`, permanent, with a reason a user can read.
* SERVFAIL, REFUSED or a timeout: :class:`RouteLookupDeferred`, temporary; the recipient
  is retried later like a 4xx.

Every answer, positive or negative, is cached for the run for as long as its TTL says
(a negative answer for the SOA minimum dnspython reports, at least 30 s here), and
concurrent lookups of one name share one query.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ..core.config import DNSConfig
from ..core.errors import PermanentDeliveryError, TemporaryDeliveryError

__all__ = [
    "MXHost",
    "MXResolver",
    "MailRoute",
    "NoMailRouteError",
    "RouteLookupDeferred",
    "make_async_resolver",
]

# A failed lookup (SERVFAIL, timeout) is not cached for long: the next recipient of the
# domain may try again soon, but not on every message of a big list.
_FAILURE_TTL = 30.0
# Negative answers (NXDOMAIN, no data) without an SOA to say how long: this long.
_NEGATIVE_TTL = 300.0


class NoMailRouteError(PermanentDeliveryError):
    """The domain cannot receive mail: null MX, NXDOMAIN, or no MX and no address."""


class RouteLookupDeferred(TemporaryDeliveryError):
    """The DNS lookup failed for now (SERVFAIL, REFUSED, timeout): retry later."""


@dataclass(frozen=True)
class MXHost:
    """One mail exchanger: its name, preference and addresses (A first, then AAAA)."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MailRoute:
    """The hosts to try for a domain, in order. ``implicit``: no MX, the domain's own address."""

    domain: str
    hosts: tuple[MXHost, ...]
    implicit: bool = False


def make_async_resolver(dns_config: DNSConfig) -> dns.asyncresolver.Resolver:
    """An asyncio resolver with the settings of ``[dns]`` (see ``checks.dns.make_resolver``)."""
    from ..checks.dns import make_resolver

    sync = make_resolver(dns_config)  # validates nameservers, reads resolv.conf when unset
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = list(sync.nameservers)
    resolver.port = sync.port
    resolver.lifetime = sync.lifetime
    resolver.timeout = sync.timeout
    resolver.search = []
    return resolver


@dataclass
class _Cached:
    expires: float
    records: tuple[tuple[int, str], ...] | tuple[str, ...] = ()
    nxdomain: bool = False
    error: str | None = None


class MXResolver:
    """MX and address lookups for one run, cached with their TTL.

    ``clock`` (monotonic seconds) and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.rng = rng or random.Random()
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[_Cached]] = {}
        self.queries = 0  # DNS questions actually asked (for tests and the benchmark)

    async def route(self, domain: str) -> MailRoute:
        """The hosts to deliver ``domain``'s mail to, in the order to try them.

        Raises :class:`NoMailRouteError` (permanent) or :class:`RouteLookupDeferred`."""
        domain = domain.strip().rstrip(".").lower()
        mx = await self._lookup(domain, "MX")
        if mx.nxdomain and mx.error:
            raise NoMailRouteError(mx.error)
        if mx.error:
            raise RouteLookupDeferred(f"MX lookup for {domain} failed: {mx.error}")
        if mx.nxdomain:
            raise NoMailRouteError(f"the domain {domain} does not exist (NXDOMAIN)")
        records = [r for r in mx.records if isinstance(r, tuple)]
        if records:
            real = [(pref, host) for pref, host in records if host != "."]
            if not real:
                # RFC 7505 section 3: the domain says it accepts no mail at all.
                raise NoMailRouteError(f"the domain {domain} accepts no mail (null MX, RFC 7505)")
            return MailRoute(domain, await self._ordered_hosts(domain, real))
        # RFC 5321 5.1: no MX, so the domain itself is the mail exchanger.
        addresses = await self.addresses(domain)
        if not addresses:
            raise NoMailRouteError(f"the domain {domain} has no MX record and no A/AAAA address")
        return MailRoute(domain, (MXHost(domain, 0, addresses),), implicit=True)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """A then AAAA addresses of ``host``; empty when it has none.

        Raises :class:`RouteLookupDeferred` when both lookups failed for now."""
        results = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"))
        found = tuple(a for r in results for a in r.records if isinstance(a, str))
        if not found and any(r.error for r in results):
            error = next(r.error for r in results if r.error)
            raise RouteLookupDeferred(f"address lookup for {host} failed: {error}")
        return found

    async def _ordered_hosts(self, domain: str, records: list[tuple[int, str]]) -> tuple[MXHost, ...]:
        by_preference: dict[int, list[str]] = {}
        for preference, host in records:
            by_preference.setdefault(preference, []).append(host)
        names: list[tuple[int, str]] = []
        for preference in sorted(by_preference):
            group = sorted(set(by_preference[preference]))
            self.rng.shuffle(group)  # RFC 5321 5.1: random among equal preferences
            names.extend((preference, host) for host in group)
        hosts: list[MXHost] = []
        deferred: RouteLookupDeferred | None = None
        for preference, host in names:
            try:
                addresses = await self.addresses(host)
            except RouteLookupDeferred as exc:
                deferred = exc
                continue
            if addresses:
                hosts.append(MXHost(host, preference, addresses))
        if not hosts:
            if deferred is not None:
                raise deferred
            raise NoMailRouteError(f"no MX host of {domain} has an address ({', '.join(h for _, h in names)})")
        return tuple(hosts)

    async def _lookup(self, name: str, rdtype: str) -> _Cached:
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > self.clock():
            return cached
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Cached] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            result = await self._query(name, rdtype)
            self._cache[key] = result
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._pending[key]

    async def _query(self, name: str, rdtype: str) -> _Cached:
        now = self.clock()
        self.queries += 1
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            return _Cached(now + _NEGATIVE_TTL, nxdomain=True, error=f"{name!r} is not a valid domain name ({exc})")
        try:
            answer = await self.resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _Cached(now + _NEGATIVE_TTL, nxdomain=True)
        except dns.exception.Timeout:
            return _Cached(now + _FAILURE_TTL, error=f"no answer within {self.resolver.lifetime:g} s")
        except dns.resolver.NoNameservers as exc:
            text = str(exc)
            why = next((c for c in ("SERVFAIL", "REFUSED", "NOTIMP", "FORMERR") if c in text), None)
            return _Cached(now + _FAILURE_TTL, error=f"the DNS server answered {why}" if why else "no usable answer")
        except (dns.exception.DNSException, OSError) as exc:
            return _Cached(now + _FAILURE_TTL, error=str(exc) or type(exc).__name__)
        rrset = answer.rrset
        if rrset is None:
            return _Cached(now + _NEGATIVE_TTL)
        ttl = float(rrset.ttl)
        if rdtype == "MX":
            mx = tuple(
                (
                    int(r.preference),
                    "." if r.exchange == dns.name.root else r.exchange.to_text(omit_final_dot=True).lower(),
                )
                for r in rrset
            )
            return _Cached(now + ttl, records=mx)
        # An RRset has no order (dnspython's is a set): sorted, so that runs repeat.
        return _Cached(now + ttl, records=tuple(sorted(r.to_text() for r in rrset)))
