"""MX resolution for direct delivery, against the loopback DNS responder."""

from __future__ import annotations

import asyncio
import random

import pytest

from mailer.core.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailer.delivery.mx import MXResolver, NoMailRouteError, RouteLookupDeferred, make_async_resolver


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_for(dns_server, *, seed: int = 1, clock=None) -> MXResolver:
    return MXResolver(make_async_resolver(dns_server.config()), rng=random.Random(seed), clock=clock or Clock())


def route(mx: MXResolver, domain: str):
    return asyncio.run(mx.route(domain))


def test_preference_order_and_addresses(dns_server) -> None:
    dns_server.set_zone(
        {
            ("a.test", "MX"): ["20 backup.a.test.", "10 primary.a.test."],
            ("primary.a.test", "A"): ["127.0.0.2"],
            ("backup.a.test", "A"): ["127.0.0.3", "127.0.0.4"],
        }
    )
    found = route(resolver_for(dns_server), "A.test.")
    assert [(h.name, h.preference, h.addresses) for h in found.hosts] == [
        ("primary.a.test", 10, ("127.0.0.2",)),
        ("backup.a.test", 20, ("127.0.0.3", "127.0.0.4")),
    ]
    assert not found.implicit


def test_equal_preferences_in_random_order_from_the_injected_source(dns_server) -> None:
    dns_server.set_zone(
        {
            ("eq.test", "MX"): [f"10 mx{i}.eq.test." for i in range(6)] + ["5 first.eq.test."],
            **{(f"mx{i}.eq.test", "A"): [f"127.0.1.{i + 1}"] for i in range(6)},
            ("first.eq.test", "A"): ["127.0.1.100"],
        }
    )

    async def orders(seed: int) -> list[tuple[str, ...]]:
        mx = resolver_for(dns_server, seed=seed)
        return [tuple(h.name for h in (await mx.route("eq.test")).hosts) for _ in range(8)]

    first = asyncio.run(orders(7))
    assert all(o[0] == "first.eq.test" for o in first)  # the lower preference always first
    assert all(sorted(o[1:]) == [f"mx{i}.eq.test" for i in range(6)] for o in first)
    assert len(set(first)) > 1  # shuffled on every call
    assert asyncio.run(orders(7)) == first  # the same seed, the same orders


def test_a_fallback_when_there_is_no_mx(dns_server) -> None:
    dns_server.set_zone({("plain.test", "A"): ["127.0.0.5"], ("plain.test", "TXT"): ["x"]})
    found = route(resolver_for(dns_server), "plain.test")
    assert found.implicit
    assert [(h.name, h.addresses) for h in found.hosts] == [("plain.test", ("127.0.0.5",))]


@pytest.mark.parametrize(
    ("zone", "reason"),
    [
        ({("null.test", "MX"): ["0 ."]}, "accepts no mail (null MX, RFC 7505)"),
        ({("other.test", "A"): ["127.0.0.1"]}, "does not exist (NXDOMAIN)"),
        ({("null.test", "TXT"): ["v=spf1 -all"]}, "has no MX record and no A/AAAA address"),
        ({("null.test", "MX"): ["10 gone.null.test."], ("null.test", "TXT"): ["x"]}, "no MX host of null.test"),
    ],
)
def test_permanent_failures_have_clear_reasons(dns_server, zone, reason) -> None:
    dns_server.set_zone(zone)
    with pytest.raises(NoMailRouteError) as caught:
        route(resolver_for(dns_server), "null.test")
    assert isinstance(caught.value, PermanentDeliveryError)
    assert reason in str(caught.value)
    assert "null.test" in str(caught.value)


@pytest.mark.parametrize(("fault", "said"), [("servfail", "SERVFAIL"), ("timeout", "no answer within")])
def test_temporary_dns_failure_is_a_deferral(dns_server, fault, said) -> None:
    dns_server.set_zone({("slow.test", "MX"): ["10 mx.slow.test."], ("mx.slow.test", "A"): ["127.0.0.2"]})
    dns_server.set_fault("slow.test", fault, rdtype="MX")
    mx = MXResolver(make_async_resolver(dns_server.config(timeout=0.3)), clock=Clock())
    with pytest.raises(RouteLookupDeferred) as caught:
        asyncio.run(mx.route("slow.test"))
    assert isinstance(caught.value, TemporaryDeliveryError)
    assert said in str(caught.value)


def test_answers_are_cached_with_their_ttl_and_lookups_shared(dns_server) -> None:
    dns_server.ttl = 60
    dns_server.set_zone({("c.test", "MX"): ["10 mx.c.test."], ("mx.c.test", "A"): ["127.0.0.2"]})
    clock = Clock()
    mx = resolver_for(dns_server, clock=clock)

    async def many() -> None:
        await asyncio.gather(*(mx.route("c.test") for _ in range(50)))

    asyncio.run(many())
    assert dns_server.count("c.test", "MX") == 1  # 50 concurrent routes, one question
    clock.now += 59
    asyncio.run(many())
    assert dns_server.count("c.test", "MX") == 1
    clock.now += 2  # past the TTL
    asyncio.run(mx.route("c.test"))
    assert dns_server.count("c.test", "MX") == 2
