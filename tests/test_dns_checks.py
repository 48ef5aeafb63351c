"""Tests for mailer.dns_checks against a real DNS responder on loopback (tests/dns_fixtures.py)."""

from __future__ import annotations

import base64
import time

import nacl.signing
import pytest

from mailer.checks.dns import (
    CheckResult,
    DomainVerdict,
    check_recipient_domains,
    check_sender_domain,
    make_resolver,
    normalize_domain,
)
from mailer.core.config import DNSConfig
from mailer.core.errors import ConfigError
from mailer.dkim.signer import DKIMSigner

DOMAIN = "acme.test"
SELECTOR = "mail2026"


def make_signer(domain: str = DOMAIN) -> DKIMSigner:
    seed = bytes(nacl.signing.SigningKey.generate())
    return DKIMSigner.from_key_bytes(base64.b64encode(seed), domain=domain, selector=SELECTOR)


@pytest.fixture
def signer() -> DKIMSigner:
    return make_signer()


@pytest.fixture
def resolver(dns_server):
    return make_resolver(dns_server.config(timeout=0.5))


def good_zone(signer: DKIMSigner) -> dict:
    """A sender domain that passes every check."""
    dkim_name, dkim_value = signer.dns_record()
    return {
        (DOMAIN, "MX"): ["20 mx2.acme.test.", "10 mx1.acme.test."],
        (DOMAIN, "TXT"): ["google-site-verification=abc123", "v=spf1 mx include:_spf.relay.test -all"],
        ("_spf.relay.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 ~all"],
        (f"_dmarc.{DOMAIN}", "TXT"): ['"v=DMARC1; p=reject; rua=mailto:dmarc@acme.test"'],
        (dkim_name, "TXT"): [dkim_value],
    }


def check(resolver, signer=None, *, domain: str = DOMAIN, **kwargs) -> dict[str, CheckResult]:
    kwargs.setdefault("dkim_selector", SELECTOR if signer else None)
    results = check_sender_domain(domain, resolver=resolver, dkim_signer_or_public_key_matcher=signer, **kwargs)
    assert [r.name for r in results] == ["MX", "SPF", "DMARC", "DKIM"]
    for result in results:
        assert result.status in ("ok", "warn", "fail")
        if result.status != "ok":
            assert result.fix, f"{result.name} {result.status} without a fix"
    return {r.name: r for r in results}


# ---------------------------------------------------------------- resolver


def test_make_resolver_uses_the_configured_server(dns_server):
    resolver = make_resolver(DNSConfig(nameservers=("127.0.0.1",), port=dns_server.port, timeout=1.5))
    assert resolver.nameservers == ["127.0.0.1"]
    assert resolver.port == dns_server.port
    assert resolver.lifetime == 1.5
    assert resolver.timeout <= 1.5


def test_make_resolver_rejects_a_nameserver_that_is_not_an_address():
    with pytest.raises(ConfigError) as caught:
        make_resolver(DNSConfig(nameservers=("dns.example",)))
    assert caught.value.key == "dns.nameservers"


def test_the_whole_good_domain_passes(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    results = check(resolver, signer)
    assert {name: r.status for name, r in results.items()} == {"MX": "ok", "SPF": "ok", "DMARC": "ok", "DKIM": "ok"}
    # Every check really asked the server.
    for name, rdtype in [
        (DOMAIN, "MX"),
        (DOMAIN, "TXT"),
        ("_spf.relay.test", "TXT"),
        (f"_dmarc.{DOMAIN}", "TXT"),
        (f"{SELECTOR}._domainkey.{DOMAIN}", "TXT"),
    ]:
        assert dns_server.count(name, rdtype) >= 1, (name, rdtype)


# ---------------------------------------------------------------- MX


def test_mx_present_lists_hosts_by_preference(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    mx = check(resolver, signer)["MX"]
    assert mx.status == "ok"
    assert mx.detail.index("10 mx1.acme.test") < mx.detail.index("20 mx2.acme.test")


def test_null_mx_fails(dns_server, resolver):
    dns_server.set_zone({(DOMAIN, "MX"): ["0 ."], (DOMAIN, "A"): ["192.0.2.1"]})
    mx = check(resolver)["MX"]
    assert mx.status == "fail"
    assert "null MX" in mx.detail and "RFC 7505" in mx.detail


def test_null_mx_mixed_with_real_mx_warns(dns_server, resolver):
    dns_server.set_zone({(DOMAIN, "MX"): ["0 .", "10 mx1.acme.test."]})
    mx = check(resolver)["MX"]
    assert mx.status == "warn" and "null MX" in mx.detail


def test_no_mx_but_an_address_warns_about_implicit_mx(dns_server, resolver):
    dns_server.set_zone({(DOMAIN, "A"): ["192.0.2.10"], (DOMAIN, "TXT"): ["v=spf1 -all"]})
    mx = check(resolver)["MX"]
    assert mx.status == "warn"
    assert "no MX" in mx.detail and "192.0.2.10" in mx.detail and "RFC 5321" in mx.detail
    assert dns_server.count(DOMAIN, "A") == 1


def test_no_mx_and_no_address_fails(dns_server, resolver):
    dns_server.set_zone({(DOMAIN, "TXT"): ["v=spf1 -all"]})
    mx = check(resolver)["MX"]
    assert mx.status == "fail" and "no MX and no A/AAAA" in mx.detail
    assert dns_server.count(DOMAIN, "AAAA") == 1


def test_nonexistent_domain_fails_everything(dns_server, resolver):
    dns_server.set_zone({("other.test", "MX"): ["10 mx.other.test."]})
    results = check(resolver)
    assert results["MX"].status == "fail" and "NXDOMAIN" in results["MX"].detail
    assert results["SPF"].status == "fail" and "does not exist" in results["SPF"].detail
    assert results["DMARC"].status == "fail"


# ---------------------------------------------------------------- SPF


def spf_zone(record: str | list[str], **extra: list[str]) -> dict:
    zone = {(DOMAIN, "MX"): ["10 mx1.acme.test."], (DOMAIN, "TXT"): record if isinstance(record, list) else [record]}
    for name, records in extra.items():
        zone[(name.replace("__", "."), "TXT")] = records
    return zone


def test_spf_ok_reports_record_and_lookup_count(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    spf = check(resolver, signer)["SPF"]
    assert spf.status == "ok"
    assert '"v=spf1 mx include:_spf.relay.test -all"' in spf.detail
    assert "2 of 10 DNS lookups" in spf.detail  # mx + include
    assert "google-site-verification" not in spf.detail


def test_spf_missing_fails_with_a_suggested_record(dns_server, resolver):
    dns_server.set_zone(spf_zone("google-site-verification=abc"))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail" and "no SPF record" in spf.detail
    assert f"TXT record at {DOMAIN}" in spf.fix and '"v=spf1 mx include:' in spf.fix


def test_two_spf_records_fail_as_permerror(dns_server, resolver):
    dns_server.set_zone(spf_zone(["v=spf1 mx -all", "v=spf1 include:_spf.relay.test -all"]))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail"
    assert "2 SPF records" in spf.detail and "permerror" in spf.detail


def test_spf1x_is_not_an_spf_record(dns_server, resolver):
    dns_server.set_zone(spf_zone(["v=spf1 -all", "v=spf10 +all"]))
    assert check(resolver)["SPF"].status == "ok"


def nested_include_zone(top: str, children: dict[str, int]) -> dict:
    """``top`` at DOMAIN; each child include holds ``n`` includes of leaf records."""
    zone = spf_zone(top)
    for child, count in children.items():
        leaves = [f"leaf{i}.{child}" for i in range(count)]
        zone[(child, "TXT")] = ["v=spf1 " + " ".join(f"include:{leaf}" for leaf in leaves) + " -all"]
        for leaf in leaves:
            zone[(leaf, "TXT")] = ["v=spf1 ip4:192.0.2.0/24 -all"]
    return zone


def test_more_than_ten_lookups_through_nested_includes_fails(dns_server, resolver):
    # The top record shows only 3 includes, but each holds 3 more: 3 + 9 = 12.
    children = {"i1.spf.test": 3, "i2.spf.test": 3, "i3.spf.test": 3}
    top = "v=spf1 " + " ".join(f"include:{c}" for c in children) + " -all"
    dns_server.set_zone(nested_include_zone(top, children))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail"
    assert "RFC 7208 §4.6.4" in spf.detail and "11+ of 10" in spf.detail
    assert dns_server.count("leaf0.i1.spf.test", "TXT") == 1  # it really followed the includes


def test_exactly_ten_lookups_is_still_ok(dns_server, resolver):
    # mx + a + 2 includes at the top, 3 includes in each: 4 + 6 = 10, the limit.
    children = {"i1.spf.test": 3, "i2.spf.test": 3}
    top = "v=spf1 mx a ip4:192.0.2.9 " + " ".join(f"include:{c}" for c in children) + " ~all"
    dns_server.set_zone(nested_include_zone(top, children))
    spf = check(resolver)["SPF"]
    assert spf.status == "ok", spf.detail
    assert "10 of 10" in spf.detail


def test_redirect_is_followed_and_counted(dns_server, resolver):
    dns_server.set_zone(spf_zone("v=spf1 redirect=_spf.acme.test", _spf__acme__test=["v=spf1 mx ~all"]))
    spf = check(resolver)["SPF"]
    assert spf.status == "ok", spf.detail
    assert "2 of 10" in spf.detail
    assert dns_server.count("_spf.acme.test", "TXT") == 1


def test_include_without_an_spf_record_fails(dns_server, resolver):
    dns_server.set_zone(spf_zone("v=spf1 include:gone.test -all"))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail" and "include:gone.test has no SPF record" in spf.detail


@pytest.mark.parametrize("record", ["v=spf1 mx +all", "v=spf1 mx all"])
def test_pass_all_fails(dns_server, resolver, record):
    dns_server.set_zone(spf_zone(record))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail" and "every server" in spf.detail


@pytest.mark.parametrize(("record", "words"), [("v=spf1 mx ?all", "?all"), ("v=spf1 mx", 'no "all"')])
def test_neutral_or_missing_all_warns(dns_server, resolver, record, words):
    dns_server.set_zone(spf_zone(record))
    spf = check(resolver)["SPF"]
    assert spf.status == "warn" and words in spf.detail
    assert "~all" in spf.fix


def test_unknown_mechanism_fails(dns_server, resolver):
    dns_server.set_zone(spf_zone("v=spf1 ip5:192.0.2.1 -all"))
    spf = check(resolver)["SPF"]
    assert spf.status == "fail" and "ip5" in spf.detail


def test_large_txt_answer_falls_back_to_tcp(dns_server, resolver):
    # A long verification token pushes the TXT answer over 512 bytes: the server
    # truncates, and the resolver must retry over TCP to see the SPF record.
    dns_server.set_zone(spf_zone(["x" * 600, "v=spf1 mx -all"]))
    spf = check(resolver)["SPF"]
    assert spf.status == "ok"
    assert dns_server.count(DOMAIN, "TXT", transport="tcp") == 1


# ---------------------------------------------------------------- DMARC


def dmarc_zone(*records: str, at: str = f"_dmarc.{DOMAIN}") -> dict:
    zone = spf_zone("v=spf1 mx -all")
    if records:
        zone[(at, "TXT")] = list(records)
    return zone


def test_dmarc_reject_is_ok(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("v=DMARC1; p=reject; rua=mailto:d@acme.test"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "ok" and "p=reject" in dmarc.detail and dmarc.fix is None


def test_dmarc_none_is_ok_with_a_note(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("v=DMARC1; p=none"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "ok"
    assert "p=none" in dmarc.detail and "only monitors" in dmarc.detail and "no rua=" in dmarc.detail
    assert "p=quarantine" in dmarc.fix


def test_dmarc_missing_fails_for_bulk_senders_with_a_suggested_record(dns_server, resolver):
    dns_server.set_zone(dmarc_zone())
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "fail" and "Gmail and Yahoo" in dmarc.detail
    assert f'"v=DMARC1; p=none; rua=mailto:dmarc@{DOMAIN}"' in dmarc.fix


def test_dmarc_missing_is_a_warning_when_not_bulk(dns_server, resolver):
    dns_server.set_zone(dmarc_zone())
    assert check(resolver, bulk=False)["DMARC"].status == "warn"


def test_two_dmarc_records_fail(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("v=DMARC1; p=none", "v=DMARC1; p=reject"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "fail" and "2 DMARC records" in dmarc.detail


def test_non_dmarc_txt_at_dmarc_name_is_ignored(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("some-other-token", "v=DMARC1; p=quarantine; rua=mailto:d@acme.test"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "ok" and "p=quarantine" in dmarc.detail


def test_dmarc_without_a_policy_fails(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("v=DMARC1; rua=mailto:d@acme.test"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "fail" and "p=" in dmarc.detail


def test_dmarc_falls_back_to_the_organizational_domain(dns_server, resolver):
    zone = dmarc_zone("v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@acme.test")
    zone[("news.acme.test", "MX")] = ["10 mx1.acme.test."]
    dns_server.set_zone(zone)
    dmarc = check(resolver, domain="news.acme.test")["DMARC"]
    assert dmarc.status == "ok"
    assert "inherited" in dmarc.detail and "p=quarantine" in dmarc.detail  # sp= applies to subdomains
    assert dns_server.count("_dmarc.news.acme.test", "TXT") == 1
    assert dns_server.count("_dmarc.acme.test", "TXT") == 1


def test_dmarc_of_a_subdomain_under_a_two_label_suffix_falls_back_past_the_suffix(dns_server, resolver):
    # news.acme.co.uk's organizational domain is acme.co.uk (Public Suffix List), not co.uk.
    zone = {
        ("news.acme.co.uk", "MX"): ["10 mx1.acme.co.uk."],
        ("_dmarc.acme.co.uk", "TXT"): ['"v=DMARC1; p=reject; rua=mailto:d@acme.co.uk"'],
        ("_dmarc.co.uk", "TXT"): ['"v=DMARC1; p=none"'],  # must never be read
    }
    dns_server.set_zone(zone)
    dmarc = check(resolver, domain="news.acme.co.uk")["DMARC"]
    assert dmarc.status == "ok", dmarc
    assert "inherited from the organizational domain acme.co.uk" in dmarc.detail and "p=reject" in dmarc.detail
    assert dns_server.count("_dmarc.co.uk", "TXT") == 0


# ---------------------------------------------------------------- DKIM


def test_dkim_published_key_matches_the_signer(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    dkim = check(resolver, signer)["DKIM"]
    assert dkim.status == "ok" and "matches" in dkim.detail
    assert dns_server.count(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT") == 1


def test_dkim_accepts_a_plain_callable_matcher(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    seen = []

    def matcher(value: str) -> bool:
        seen.append(value)
        return signer.public_key_matches(value)

    assert check(resolver, matcher, dkim_selector=SELECTOR)["DKIM"].status == "ok"
    assert seen and seen[0] == signer.dns_record()[1]


def test_dkim_multi_string_txt_is_joined(dns_server, resolver, signer):
    name, value = signer.dns_record()
    half = len(value) // 2
    zone = good_zone(signer)
    zone[(name, "TXT")] = [f'"{value[:half]}" "{value[half:]}"']
    dns_server.set_zone(zone)
    assert check(resolver, signer)["DKIM"].status == "ok"


def test_dkim_key_mismatch_fails_with_the_record_to_publish(dns_server, resolver, signer):
    zone = good_zone(signer)
    zone[(signer.dns_record()[0], "TXT")] = [make_signer().dns_record()[1]]  # another key
    dns_server.set_zone(zone)
    dkim = check(resolver, signer)["DKIM"]
    assert dkim.status == "fail" and "does not match" in dkim.detail
    assert signer.dns_record()[1] in dkim.fix and signer.dns_record()[0] in dkim.fix


def test_dkim_missing_fails_with_the_exact_record(dns_server, resolver, signer):
    zone = good_zone(signer)
    del zone[(signer.dns_record()[0], "TXT")]
    dns_server.set_zone(zone)
    dkim = check(resolver, signer)["DKIM"]
    assert dkim.status == "fail" and "no DKIM key published" in dkim.detail
    name, value = signer.dns_record()
    assert f'TXT record at {name}: "{value}"' in dkim.fix


def test_dkim_not_configured_warns(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    dkim = check(resolver)["DKIM"]
    assert dkim.status == "warn" and "Gmail" in dkim.detail and "[dkim]" in dkim.fix
    assert dns_server.count(rdtype="TXT", name=f"{SELECTOR}._domainkey.{DOMAIN}") == 0


def test_dkim_revoked_key_fails(dns_server, resolver, signer):
    zone = good_zone(signer)
    zone[(signer.dns_record()[0], "TXT")] = ["v=DKIM1; k=ed25519; p="]
    dns_server.set_zone(zone)
    dkim = check(resolver, signer)["DKIM"]
    assert dkim.status == "fail" and "revoked" in dkim.detail


def test_dkim_testing_flag_warns(dns_server, resolver, signer):
    zone = good_zone(signer)
    zone[(signer.dns_record()[0], "TXT")] = [signer.dns_record()[1] + "; t=y"]
    dns_server.set_zone(zone)
    dkim = check(resolver, signer)["DKIM"]
    assert dkim.status == "warn" and "t=y" in dkim.detail


def test_dkim_signing_domain_that_does_not_align_warns(dns_server, resolver):
    other = make_signer(domain="esp.example")
    zone = spf_zone("v=spf1 mx -all")
    zone[other.dns_record()[0], "TXT"] = [other.dns_record()[1]]
    dns_server.set_zone(zone)
    dkim = check(resolver, other, dkim_domain="esp.example")["DKIM"]
    assert dkim.status == "warn" and "does not align" in dkim.detail


# ---------------------------------------------------------------- faults


def test_timeout_on_one_lookup_is_a_warning_not_an_exception(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    dns_server.set_fault(DOMAIN, "timeout", rdtype="MX")
    started = time.monotonic()
    results = check(resolver, signer)
    assert time.monotonic() - started < 3
    assert results["MX"].status == "warn"
    assert "DNS lookup timed out" in results["MX"].detail and f"{DOMAIN} MX" in results["MX"].detail
    assert "dig" in results["MX"].fix
    # The other checks still ran and passed.
    assert [results[n].status for n in ("SPF", "DMARC", "DKIM")] == ["ok", "ok", "ok"]


def test_servfail_is_a_warning_naming_the_lookup(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    dns_server.set_fault(f"_dmarc.{DOMAIN}", "servfail")
    dmarc = check(resolver, signer)["DMARC"]
    assert dmarc.status == "warn"
    assert "SERVFAIL" in dmarc.detail and f"_dmarc.{DOMAIN} TXT" in dmarc.detail


def test_timeout_inside_an_spf_include_is_a_warning(dns_server, resolver, signer):
    dns_server.set_zone(good_zone(signer))
    dns_server.set_fault("_spf.relay.test", "timeout")
    spf = check(resolver, signer)["SPF"]
    assert spf.status == "warn" and "could not follow include:_spf.relay.test" in spf.detail


def test_refused_everywhere_gives_warnings_only(dns_server, signer):
    dns_server.set_zone(good_zone(signer))
    for name in (DOMAIN, f"_dmarc.{DOMAIN}", f"{SELECTOR}._domainkey.{DOMAIN}"):
        dns_server.set_fault(name, "refused")
    resolver = make_resolver(dns_server.config(timeout=0.5))
    results = check(resolver, signer)
    assert {r.status for r in results.values()} == {"warn"}
    assert all("REFUSED" in r.detail for r in results.values())


# ---------------------------------------------------------------- recipient domains


def recipient_zone() -> dict:
    return {
        ("mx.test", "MX"): ["10 in1.mx.test.", "5 in0.mx.test."],
        ("null.test", "MX"): ["0 ."],
        ("aonly.test", "A"): ["192.0.2.7"],
        ("v6only.test", "AAAA"): ["2001:db8::7"],
        ("nomail.test", "TXT"): ["v=spf1 -all"],
    }


def test_recipient_domain_verdicts(dns_server, resolver):
    dns_server.set_zone(recipient_zone())
    dns_server.set_fault("slow.test", "timeout")
    dns_server.set_fault("broken.test", "servfail")
    verdicts = check_recipient_domains(
        [
            "mx.test",
            "null.test",
            "aonly.test",
            "v6only.test",
            "nomail.test",
            "missing.test",
            "slow.test",
            "broken.test",
        ],
        resolver=resolver,
    )
    summary = {d: (v.status, v.reason) for d, v in verdicts.items()}
    assert summary == {
        "mx.test": ("ok", "mx"),
        "null.test": ("fail", "null-mx"),
        "aonly.test": ("ok", "implicit-mx"),
        "v6only.test": ("ok", "implicit-mx"),
        "nomail.test": ("fail", "no-mail-host"),
        "missing.test": ("fail", "nxdomain"),
        "slow.test": ("warn", "timeout"),
        "broken.test": ("warn", "dns-error"),
    }
    assert verdicts["mx.test"].mx_hosts == ("5 in0.mx.test", "10 in1.mx.test")
    assert verdicts["mx.test"].can_receive is True
    assert verdicts["missing.test"].can_receive is False
    assert verdicts["slow.test"].can_receive is None
    assert "timed out" in verdicts["slow.test"].detail
    assert "SERVFAIL" in verdicts["broken.test"].detail
    # A domain with an MX is not asked for addresses.
    assert dns_server.count("mx.test", "A") == 0


def test_recipient_domains_are_deduplicated_case_insensitively(dns_server, resolver):
    dns_server.set_zone(recipient_zone())
    verdicts = check_recipient_domains(["MX.test", "mx.test.", " mx.test", "Null.Test"], resolver=resolver)
    assert list(verdicts) == ["mx.test", "null.test"]
    assert normalize_domain("MX.test.") == "mx.test"
    assert dns_server.count("mx.test", "MX") == 1


def test_invalid_domain_name_fails_without_a_query(dns_server, resolver):
    verdicts = check_recipient_domains(["bad..test", "x" * 70 + ".test"], resolver=resolver)
    assert {v.reason for v in verdicts.values()} == {"invalid-name"}
    assert {v.status for v in verdicts.values()} == {"fail"}
    assert dns_server.queries == []


def test_progress_callback_counts_every_domain(dns_server, resolver):
    dns_server.set_zone(recipient_zone())
    calls: list[tuple[int, int]] = []
    check_recipient_domains(
        ["mx.test", "null.test", "aonly.test", "mx.test"],
        resolver=resolver,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_cache_is_shared_between_calls(dns_server, resolver):
    dns_server.set_zone(recipient_zone())
    cache: dict[str, DomainVerdict] = {}
    first = check_recipient_domains(["mx.test", "null.test"], resolver=resolver, cache=cache)
    asked = len(dns_server.queries)
    second = check_recipient_domains(["null.test", "mx.test"], resolver=resolver, cache=cache)
    assert len(dns_server.queries) == asked
    assert second["mx.test"] == first["mx.test"]


def test_lookups_run_concurrently(dns_server, resolver):
    # Each answer takes 0.1 s: one at a time, 60 domains would take 6 s.
    dns_server.set_zone({(f"slow{i}.test", "MX"): [f"10 mx.slow{i}.test."] for i in range(60)})
    dns_server.latency = 0.1
    started = time.monotonic()
    verdicts = check_recipient_domains([f"slow{i}.test" for i in range(60)], resolver=resolver, concurrency=30)
    elapsed = time.monotonic() - started
    assert all(v.status == "ok" for v in verdicts.values())
    assert elapsed < 4.0, f"took {elapsed:.2f} s"  # one at a time: 6 s


def test_five_thousand_domains_are_each_queried_once(dns_server):
    domains = [f"d{i}.bulk.test" for i in range(5000)]
    dns_server.set_zone({(d, "MX"): [f"10 mx.{d}."] for d in domains})
    # A generous per-lookup timeout: the in-process server shares the CPU with the client.
    resolver = make_resolver(dns_server.config(timeout=5))
    verdicts = check_recipient_domains(domains + [d.upper() for d in domains[:500]], resolver=resolver)
    assert len(verdicts) == 5000
    assert all(v.status == "ok" for v in verdicts.values())
    names = [q.name for q in dns_server.queries]
    assert len(names) == 5000 and len(set(names)) == 5000
    # How long this takes is measured by `python bench/bench.py check`, not here.


# ---------------------------------------------------------------- one tag-list parser (dkim.record)


def test_dkim_tag_names_are_case_sensitive_as_verifiers_read_them(dns_server, resolver, signer):
    # RFC 6376 §3.2: "P=" is not "p=", so verifiers find no key in this record; the
    # check used to lower-case names and call it published.
    name, value = signer.dns_record()
    zone = good_zone(signer)
    zone[(name, "TXT")] = [value.replace("v=", "V=").replace("p=", "P=")]
    dns_server.set_zone(zone)
    dkim = check(resolver, dkim_selector=SELECTOR)["DKIM"]
    assert dkim.status == "fail" and "holds no DKIM key record" in dkim.detail


def test_a_dkim_record_with_an_empty_tag_spec_is_not_a_key(dns_server, resolver, signer):
    name, value = signer.dns_record()
    zone = good_zone(signer)
    zone[(name, "TXT")] = [value.replace("; k=", ";; k=")]
    dns_server.set_zone(zone)
    dkim = check(resolver, dkim_selector=SELECTOR)["DKIM"]
    assert dkim.status == "fail" and "holds no DKIM key record" in dkim.detail


def test_dmarc_tag_names_are_case_insensitive(dns_server, resolver):
    dns_server.set_zone(dmarc_zone("v=DMARC1; P=reject; RUA=mailto:d@acme.test"))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "ok" and "p=reject" in dmarc.detail and "rua" not in dmarc.detail


@pytest.mark.parametrize("record", ["v=DMARC1; p=none; p=reject", "v=DMARC1; p=reject; P=none"])
def test_a_dmarc_record_with_a_tag_twice_is_not_a_valid_tag_list(dns_server, resolver, record):
    dns_server.set_zone(dmarc_zone(record))
    dmarc = check(resolver)["DMARC"]
    assert dmarc.status == "fail" and "not a valid tag list" in dmarc.detail and dmarc.fix
