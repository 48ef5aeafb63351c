"""DNS checks behind ``mailer check``: is the sender domain ready, can the recipients' domains receive?

Two questions, answered with dnspython through a resolver passed in (build one with
:func:`make_resolver`, so that tests and labs can point it at their own server):

* :func:`check_sender_domain` — MX, SPF (RFC 7208), DMARC (RFC 7489) and DKIM
  (RFC 6376) records of the domain mail is sent from, each as a :class:`CheckResult`
  with a status, what was found and what to do about it.
* :func:`check_recipient_domains` — for each distinct recipient domain, whether it can
  receive mail at all (MX, null MX, implicit MX), looked up concurrently and once.

No lookup failure escapes as an exception: a timeout or SERVFAIL becomes a "warn"
result that says which lookup failed, because "could not check" is an answer the
user can act on, and a traceback is not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal, Protocol

import dns.exception
import dns.name
import dns.rdata
import dns.rdtypes.mxbase
import dns.rdtypes.txtbase
import dns.resolver
from publicsuffixlist import PublicSuffixList

from ..core.config import DNSConfig
from ..core.errors import ConfigError
from ..dkim.record import parse_tag_list

__all__ = [
    "SPF_LOOKUP_LIMIT",
    "CheckResult",
    "DomainVerdict",
    "PublicKeyMatcher",
    "Status",
    "check_recipient_domains",
    "check_sender_domain",
    "make_resolver",
    "normalize_domain",
]


Status = Literal["ok", "warn", "fail"]

#: RFC 7208 §4.6.4: at most 10 terms that cause DNS queries per SPF evaluation.
SPF_LOOKUP_LIMIT = 10

# Terms that make an SPF evaluation query DNS (RFC 7208 §4.6.4).
_SPF_LOOKUP_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_SPF_KNOWN_MECHANISMS = _SPF_LOOKUP_MECHANISMS | {"all", "ip4", "ip6"}
_SPF_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$")
# Nested include/redirect chains deeper than this are cut short; the lookup count
# is already far over the limit by then.
_SPF_MAX_DEPTH = 12

_RELAY_SPF_EXAMPLES = (
    "include:amazonses.com (SES), include:sendgrid.net, include:mailgun.org, "
    "include:spf.protection.outlook.com (Microsoft 365), include:_spf.google.com (Gmail)"
)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    ``name`` is the check ("MX", "SPF", "DMARC", "DKIM"); ``status`` is "ok",
    "warn" or "fail"; ``detail`` says what was found (the record itself when there
    is one); ``fix`` says what to do about a warn or fail, often the exact record to
    publish, and is None when there is nothing to do.
    """

    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class DomainVerdict:
    """Whether one recipient domain can receive mail.

    ``status``: "ok" (it can), "fail" (it cannot: mail to it will bounce) or "warn"
    (unknown: the lookup timed out or failed). ``reason`` is a stable code for
    programs — "mx", "implicit-mx", "null-mx", "nxdomain", "no-mail-host",
    "invalid-name", "timeout" or "dns-error" — and ``detail`` a sentence for people.
    ``mx_hosts`` lists the mail exchangers, best preference first, when there are any.
    """

    domain: str
    status: Status
    reason: str
    detail: str
    mx_hosts: tuple[str, ...] = ()

    @property
    def can_receive(self) -> bool | None:
        """True or False when DNS says so, None when the lookup did not answer."""
        return {"ok": True, "fail": False}.get(self.status)


class PublicKeyMatcher(Protocol):
    """What the DKIM check needs from a signer (``mailer.dkim.DKIMSigner`` is one).

    ``dns_record`` is optional in practice: an object without it just means the fix
    text cannot quote the record to publish.
    """

    def public_key_matches(self, txt_value: str) -> bool: ...


# What check_sender_domain accepts to compare the published DKIM key with the private one.
_Matcher = PublicKeyMatcher | Callable[[str], bool] | None


# ---------------------------------------------------------------------- resolver


def make_resolver(dns_config: DNSConfig) -> dns.resolver.Resolver:
    """A dnspython resolver configured from ``[dns]``.

    With ``nameservers`` set, only those are asked (on ``port``), and
    ``/etc/resolv.conf`` is not read; otherwise the system's resolver configuration
    is used. ``timeout`` bounds each whole lookup (dnspython's ``lifetime``); a
    single attempt waits at most 2 s, so one lost UDP packet is retried in time.
    Raises :class:`ConfigError` for a nameserver that is not an IP address, or when
    there is no system configuration and none in the file.
    """
    if dns_config.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        try:
            resolver.nameservers = list(dns_config.nameservers)
        except ValueError as exc:
            raise ConfigError(
                f"'dns.nameservers' has an entry that is not an IP address ({exc}).",
                key="dns.nameservers",
                hint='Write IP addresses, for example nameservers = ["127.0.0.1", "9.9.9.9"].',
            ) from None
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError(
                "this system has no DNS resolver configuration (/etc/resolv.conf).",
                key="dns.nameservers",
                hint='Set [dns] nameservers = ["<resolver IP>"] in mailer.toml.',
            ) from None
    resolver.port = dns_config.port
    resolver.lifetime = float(dns_config.timeout)
    resolver.timeout = min(float(dns_config.timeout), 2.0)
    return resolver


def normalize_domain(domain: str) -> str:
    """The form used as a key by :func:`check_recipient_domains`: stripped, no final dot, lower case."""
    return domain.strip().rstrip(".").lower()


# ---------------------------------------------------------------------- lookups


@dataclass(frozen=True)
class _Answer:
    """One lookup's outcome. ``error`` is set when DNS gave no usable answer."""

    qname: str
    rdtype: str
    records: tuple[dns.rdata.Rdata, ...] = ()
    nxdomain: bool = False
    error: str | None = None
    error_kind: str | None = None  # "timeout" | "dns-error" | "invalid-name"

    @property
    def texts(self) -> list[str]:
        """TXT records, each with its strings concatenated (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [
            b"".join(r.strings).decode("utf-8", errors="replace")
            for r in self.records
            if isinstance(r, dns.rdtypes.txtbase.TXTBase)
        ]

    @property
    def mx_records(self) -> list[dns.rdtypes.mxbase.MXBase]:
        """MX records (an MX answer holds nothing else)."""
        return [r for r in self.records if isinstance(r, dns.rdtypes.mxbase.MXBase)]


def _lookup(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> _Answer:
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        return _Answer(name, rdtype, error=f"{name!r} is not a valid domain name ({exc})", error_kind="invalid-name")
    try:
        answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return _Answer(name, rdtype, nxdomain=True)
    except dns.exception.Timeout:
        return _Answer(
            name,
            rdtype,
            error=f"DNS lookup timed out: {name} {rdtype} (no answer within {resolver.lifetime:g} s)",
            error_kind="timeout",
        )
    except dns.resolver.NoNameservers as exc:
        text = str(exc)
        why = next((code for code in ("SERVFAIL", "REFUSED", "NOTIMP", "FORMERR") if code in text), None)
        reason = f"the DNS server answered {why}" if why else "no DNS server gave a usable answer"
        return _Answer(name, rdtype, error=f"DNS lookup failed: {name} {rdtype}: {reason}", error_kind="dns-error")
    except (dns.exception.DNSException, OSError) as exc:
        # OSError: a socket error dnspython did not turn into a DNS exception.
        return _Answer(name, rdtype, error=f"DNS lookup failed: {name} {rdtype}: {exc}", error_kind="dns-error")
    return _Answer(name, rdtype, records=tuple(answer.rrset) if answer.rrset is not None else ())


@dataclass(frozen=True)
class _MailRoute:
    """Where mail for a domain goes, by RFC 5321 §5.1 and RFC 7505."""

    kind: str  # "mx" | "null-mx" | "mixed-null-mx" | "implicit-mx" | "no-mail-host" | "nxdomain" | "error"
    mx_hosts: tuple[str, ...] = ()
    error: _Answer | None = None  # set exactly when kind is "error"


def _find_mail_route(resolver: dns.resolver.Resolver, domain: str) -> _MailRoute:
    mx = _lookup(resolver, domain, "MX")
    if mx.error:
        return _MailRoute("error", error=mx)
    if mx.nxdomain:
        return _MailRoute("nxdomain")
    if mx.records:
        ordered = sorted(mx.mx_records, key=lambda r: (r.preference, str(r.exchange)))
        # RFC 7505 §3: a null MX is one record with preference 0 and exchange ".".
        null = [r for r in ordered if r.exchange == dns.name.root]
        hosts = tuple(
            f"{r.preference} {'.' if r.exchange == dns.name.root else r.exchange.to_text(omit_final_dot=True)}"
            for r in ordered
        )
        if null and len(null) == len(ordered):
            return _MailRoute("null-mx", hosts)
        if null:
            return _MailRoute("mixed-null-mx", hosts)
        return _MailRoute("mx", hosts)
    # No MX: RFC 5321 §5.1 says the domain's own address is the mail exchanger.
    timeouts: list[_Answer] = []
    for rdtype in ("A", "AAAA"):
        address = _lookup(resolver, domain, rdtype)
        if address.records:
            return _MailRoute("implicit-mx", (f"{domain} ({rdtype} {address.records[0]})",))
        if address.error:
            timeouts.append(address)
    if timeouts:
        return _MailRoute("error", error=timeouts[0])
    return _MailRoute("no-mail-host")


# ---------------------------------------------------------------------- sender domain


def check_sender_domain(
    domain: str,
    *,
    resolver: dns.resolver.Resolver,
    dkim_selector: str | None = None,
    dkim_signer_or_public_key_matcher: _Matcher = None,
    dkim_domain: str | None = None,
    bulk: bool = True,
) -> list[CheckResult]:
    """Check the DNS of the domain in ``From:``: MX, SPF, DMARC, DKIM, in that order.

    ``dkim_selector`` is ``[dkim] selector`` (None: DKIM is not configured, a warning);
    ``dkim_signer_or_public_key_matcher`` compares the published key with the private
    one — a :class:`mailer.dkim.DKIMSigner`, any object with ``public_key_matches``
    (and, to quote the record to publish, ``dns_record``), or a plain callable taking
    the TXT value. ``dkim_domain`` is ``[dkim] domain`` when it differs from the From
    domain. ``bulk`` makes a missing DMARC record a failure rather than a warning,
    as Gmail and Yahoo require of bulk senders since February 2024.

    Never raises for DNS problems: they become "warn" results naming the lookup.
    """
    domain = normalize_domain(domain)
    return [
        _check_mx(resolver, domain),
        _check_spf(resolver, domain),
        _check_dmarc(resolver, domain, bulk=bulk),
        _check_dkim(
            resolver,
            domain,
            selector=dkim_selector,
            matcher=dkim_signer_or_public_key_matcher,
            dkim_domain=normalize_domain(dkim_domain) if dkim_domain else domain,
        ),
    ]


def _lookup_warning(name: str, answer: _Answer, what: str) -> CheckResult:
    return CheckResult(
        name,
        "warn",
        f"could not check {what}: {answer.error}.",
        "Run the check again; if it persists, ask your DNS host why the lookup fails "
        f"(`dig {answer.qname} {answer.rdtype} +trace` shows where it stops).",
    )


def _check_mx(resolver: dns.resolver.Resolver, domain: str) -> CheckResult:
    route = _find_mail_route(resolver, domain)
    if route.error is not None:  # kind "error"
        return _lookup_warning("MX", route.error, "where mail for the domain goes")
    if route.kind == "nxdomain":
        return CheckResult(
            "MX",
            "fail",
            f"{domain} does not exist in DNS (NXDOMAIN): receivers reject mail from a domain that does not exist.",
            f"Check the spelling of the From domain, or register {domain} and publish its records.",
        )
    if route.kind == "null-mx":
        return CheckResult(
            "MX",
            "fail",
            f'{domain} publishes a null MX ("0 .", RFC 7505): it declares that it receives no mail, so '
            "replies and bounces to it are lost, and receivers may reject mail from it (RFC 7505 §4.2).",
            f"Replace the null MX with the host that receives mail for {domain}, e.g. "
            f'"{domain}. MX 10 mail.{domain}.", or send from a domain that receives mail.',
        )
    if route.kind == "mixed-null-mx":
        return CheckResult(
            "MX",
            "warn",
            f"{domain} mixes a null MX with other MX records ({', '.join(route.mx_hosts)}); "
            "RFC 7505 §3 forbids this and receivers may treat the domain as receiving no mail.",
            'Remove the "0 ." MX record.',
        )
    if route.kind == "implicit-mx":
        return CheckResult(
            "MX",
            "warn",
            f"{domain} has no MX record; mail to it goes to its address record {route.mx_hosts[0]} "
            "(implicit MX, RFC 5321 §5.1). Replies and bounces are lost unless that host accepts mail.",
            f"Publish an MX record for {domain} naming the host that receives its mail.",
        )
    if route.kind == "no-mail-host":
        return CheckResult(
            "MX",
            "fail",
            f"{domain} has no MX and no A/AAAA record: it cannot receive replies or bounces, and many "
            "receivers reject senders whose domain cannot receive mail (Postfix reject_unknown_sender_domain).",
            f"Publish an MX record for {domain} naming the host that receives its mail.",
        )
    return CheckResult("MX", "ok", f"{domain} receives mail at {', '.join(route.mx_hosts)}.")


# ------------------------------------------------------------------------ SPF


def _is_spf(text: str) -> bool:
    # RFC 7208 §4.5: exactly "v=spf1" followed by a space or the end.
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


@dataclass
class _SPFWalk:
    lookups: int = 0
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _spf_terms(record: str) -> list[tuple[str, str, str]]:
    """Split an SPF record into (qualifier, name, value) terms; modifiers get qualifier "="."""
    terms = []
    for term in record.split()[1:]:
        modifier = _SPF_MODIFIER.match(term)
        if modifier:
            terms.append(("=", modifier.group(1).lower(), modifier.group(2)))
            continue
        qualifier = term[0] if term[0] in "+-~?" else "+"
        body = term[1:] if term[0] in "+-~?" else term
        name, _, value = body.partition(":")
        name = name.split("/", 1)[0]  # "a/24", "mx/24//64"
        terms.append((qualifier, name.lower(), value))
    return terms


def _walk_spf(resolver: dns.resolver.Resolver, record: str, walk: _SPFWalk, *, depth: int) -> str | None:
    """Count DNS-querying terms through include/redirect; return the effective ``all`` qualifier."""
    terms = _spf_terms(record)
    all_qualifier = next((q for q, name, _ in terms if name == "all" and q != "="), None)
    redirect = next((value for q, name, value in terms if q == "=" and name == "redirect"), None)
    for qualifier, name, value in terms:
        if walk.lookups > SPF_LOOKUP_LIMIT or depth > _SPF_MAX_DEPTH:
            return all_qualifier
        if qualifier == "=":
            continue
        if name not in _SPF_KNOWN_MECHANISMS:
            walk.failures.append(f"unknown mechanism {name!r} (a permerror, RFC 7208 §4.6.1)")
            continue
        if name not in _SPF_LOOKUP_MECHANISMS:
            continue
        walk.lookups += 1
        if name == "ptr":
            walk.warnings.append("the ptr mechanism is slow and deprecated (RFC 7208 §5.5: SHOULD NOT be used)")
        if name == "include":
            _follow_spf(resolver, value, walk, depth=depth, how="include")
    # RFC 7208 §6.1: redirect is ignored when the record has an "all" mechanism.
    if redirect and all_qualifier is None and walk.lookups <= SPF_LOOKUP_LIMIT:
        walk.lookups += 1
        return _follow_spf(resolver, redirect, walk, depth=depth, how="redirect")
    return all_qualifier


def _follow_spf(resolver: dns.resolver.Resolver, target: str, walk: _SPFWalk, *, depth: int, how: str) -> str | None:
    if "%" in target:
        walk.warnings.append(f"{how}:{target} uses macros, not expanded by this check (its lookups are not counted)")
        return None
    answer = _lookup(resolver, target, "TXT")
    if answer.error:
        walk.warnings.append(f"could not follow {how}:{target} ({answer.error})")
        return None
    records = [t for t in answer.texts if _is_spf(t)]
    if len(records) != 1:
        problem = "has no SPF record" if not records else "has more than one SPF record"
        # RFC 7208 §5.2 (include) and §6.1 (redirect): a permerror for the whole check.
        walk.failures.append(f"{how}:{target} {problem} (a permerror for receivers, RFC 7208 §5.2/§6.1)")
        return None
    return _walk_spf(resolver, records[0], walk, depth=depth + 1)


def _check_spf(resolver: dns.resolver.Resolver, domain: str) -> CheckResult:
    suggestion = (
        f'Publish one TXT record at {domain}: "v=spf1 mx include:<your relay\'s SPF domain> ~all" '
        f'(for example {_RELAY_SPF_EXAMPLES}); drop "mx" if your MX hosts do not send mail.'
    )
    answer = _lookup(resolver, domain, "TXT")
    if answer.error:
        return _lookup_warning("SPF", answer, "the SPF record")
    records = [t for t in answer.texts if _is_spf(t)]
    if not records:
        where = f"{domain} does not exist" if answer.nxdomain else f'{domain} has no SPF record (TXT "v=spf1 ...")'
        return CheckResult(
            "SPF",
            "fail",
            f"{where}: receivers cannot tell which servers may send as {domain}, and Gmail/Yahoo reject "
            "unauthenticated bulk mail.",
            suggestion,
        )
    if len(records) > 1:
        listed = "; ".join(f'"{r}"' for r in records)
        return CheckResult(
            "SPF",
            "fail",
            f"{domain} has {len(records)} SPF records ({listed}): receivers return permerror and treat "
            "the mail as having no SPF (RFC 7208 §4.5).",
            "Merge them into one TXT record starting with v=spf1, keeping every include: and ip4:/ip6: term once.",
        )
    record = records[0]
    walk = _SPFWalk()
    all_qualifier = _walk_spf(resolver, record, walk, depth=0)
    count = f"{walk.lookups}{'+' if walk.lookups > SPF_LOOKUP_LIMIT else ''} of {SPF_LOOKUP_LIMIT} DNS lookups"
    detail = f'"{record}" ({count})'
    if walk.lookups > SPF_LOOKUP_LIMIT:
        return CheckResult(
            "SPF",
            "fail",
            f"{detail}: more than {SPF_LOOKUP_LIMIT} DNS-querying terms (include, a, mx, ptr, exists, redirect, "
            "counted through every include) make receivers return permerror (RFC 7208 §4.6.4).",
            "Remove includes you no longer send through, replace a/mx terms with ip4:/ip6: ranges, "
            "or move some senders to a subdomain with its own SPF record.",
        )
    if walk.failures:
        return CheckResult(
            "SPF", "fail", f"{detail}: {'; '.join(walk.failures)}.", "Fix or remove the terms named above."
        )
    if all_qualifier == "+":
        return CheckResult(
            "SPF",
            "fail",
            f'{detail}: "+all" authorizes every server on the Internet to send as {domain}.',
            'End the record with "~all" (soft fail) or "-all" (fail) instead of "+all".',
        )
    notes = list(walk.warnings)
    if all_qualifier == "?":
        notes.append('"?all" makes unlisted servers neutral: anyone can send as the domain without failing SPF')
    elif all_qualifier is None:
        notes.append('no "all" term: unlisted servers get the default neutral result (RFC 7208 §4.7)')
    if notes:
        return CheckResult(
            "SPF",
            "warn",
            f"{detail}: {'; '.join(notes)}.",
            'End the record with "~all" or "-all".' if all_qualifier in ("?", None) else "See the notes above.",
        )
    return CheckResult("SPF", "ok", detail)


# ---------------------------------------------------------------------- DMARC


def _is_dmarc(text: str) -> bool:
    # RFC 7489 §6.6.3: records that do not start with v=DMARC1 are discarded.
    return re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", text, re.IGNORECASE) is not None


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package: no download


def _organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the domain one label below its public suffix.

    ``news.acme.co.uk`` → ``acme.co.uk`` (not ``co.uk``), from the Public Suffix
    List; a domain that is itself a public suffix is its own organizational domain.
    """
    return _public_suffixes().privatesuffix(domain.lower().rstrip(".")) or domain.lower().rstrip(".")


def _check_dmarc(resolver: dns.resolver.Resolver, domain: str, *, bulk: bool) -> CheckResult:
    suggestion = (
        f'Publish a TXT record at _dmarc.{domain}: "v=DMARC1; p=none; rua=mailto:dmarc@{domain}" '
        "(start with p=none, read the reports, then move to p=quarantine or p=reject)."
    )
    looked_at = [domain]
    organizational = _organizational_domain(domain)
    if organizational != domain:
        looked_at.append(organizational)
    for where in looked_at:
        answer = _lookup(resolver, f"_dmarc.{where}", "TXT")
        if answer.error:
            return _lookup_warning("DMARC", answer, "the DMARC record")
        records = [t for t in answer.texts if _is_dmarc(t)]
        if records:
            break
    else:
        names = " or ".join(f"_dmarc.{d}" for d in looked_at)
        return CheckResult(
            "DMARC",
            "fail" if bulk else "warn",
            f"no DMARC record at {names}"
            + (": Gmail and Yahoo require one from bulk senders (since February 2024)." if bulk else "."),
            suggestion,
        )
    if len(records) > 1:
        listed = "; ".join(f'"{r}"' for r in records)
        return CheckResult(
            "DMARC",
            "fail",
            f"_dmarc.{where} has {len(records)} DMARC records ({listed}): receivers then apply no DMARC "
            "at all (RFC 7489 §6.6.3).",
            f"Keep exactly one TXT record starting with v=DMARC1 at _dmarc.{where}.",
        )
    record = records[0]
    inherited = f" (inherited from the organizational domain {where})" if where != domain else ""
    tags = parse_tag_list(record, fold_names=True)
    if tags is None:
        return CheckResult(
            "DMARC",
            "fail",
            f'_dmarc.{where}: "{record}"{inherited} is not a valid tag list (tag=value pairs separated by ";", '
            "each tag once; RFC 7489 §6.4, RFC 6376 §3.2), so receivers may ignore it.",
            suggestion,
        )
    # RFC 7489 §6.3: sp= is the policy for subdomains of the organizational domain.
    policy_tag = "sp" if where != domain and "sp" in tags else "p"
    policy = tags.get(policy_tag, "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return CheckResult(
            "DMARC",
            "fail",
            f'_dmarc.{where}: "{record}"{inherited} has no valid p= policy (RFC 7489 §6.3), so receivers ignore it.',
            suggestion,
        )
    notes = []
    if policy == "none":
        notes.append("p=none only monitors: receivers take no action on mail that fails DMARC")
    if "rua" not in tags:
        notes.append("no rua= address, so you get no aggregate reports")
    pct = tags.get("pct")
    if pct and pct != "100" and policy != "none":
        notes.append(f"pct={pct} applies the policy to only part of the failing mail")
    detail = f'_dmarc.{where}: "{record}"{inherited}: policy {policy_tag}={policy}'
    if notes:
        detail += " — " + "; ".join(notes)
    fix = None
    if policy == "none":
        fix = "Once the aggregate reports show all your mail passing, move to p=quarantine, then p=reject."
    return CheckResult("DMARC", "ok", detail + ".", fix)


# ----------------------------------------------------------------------- DKIM


def _matcher_parts(matcher: _Matcher) -> tuple[Callable[[str], bool] | None, tuple[str, str] | None]:
    if matcher is None:
        return None, None
    record = None
    dns_record = getattr(matcher, "dns_record", None)
    if callable(dns_record):
        record = dns_record()
    compare = getattr(matcher, "public_key_matches", None)
    if compare is None and callable(matcher):
        compare = matcher
    return compare, record


def _check_dkim(
    resolver: dns.resolver.Resolver,
    domain: str,
    *,
    selector: str | None,
    matcher: _Matcher,
    dkim_domain: str,
) -> CheckResult:
    if not selector:
        return CheckResult(
            "DKIM",
            "warn",
            "no [dkim] section in the config: unsigned bulk mail is junked or rejected by Gmail, Yahoo and Outlook.",
            f"Make a key (`openssl genrsa -out dkim-private.pem 2048 && chmod 600 dkim-private.pem`), add "
            f'[dkim] domain = "{domain}", selector = "mail1", private_key = "dkim-private.pem" to mailer.toml, '
            "and run `mailer check` again to see the DNS record to publish.",
        )
    compare, expected = _matcher_parts(matcher)
    name = f"{selector}._domainkey.{dkim_domain}"
    if expected is not None:
        publish = f'Publish a TXT record at {expected[0]}: "{expected[1]}" (if your DNS host limits strings to 255 characters, split the value into several quoted strings; verifiers join them).'
    else:
        publish = f'Publish the public key of [dkim] private_key as a TXT record at {name}: "v=DKIM1; k=rsa; p=<base64 public key>".'

    answer = _lookup(resolver, name, "TXT")
    if answer.error:
        return _lookup_warning("DKIM", answer, "the DKIM key record")
    texts = answer.texts
    if not texts:
        return CheckResult(
            "DKIM",
            "fail",
            f"no DKIM key published at {name}: receivers cannot verify your signatures, and treat the mail as unsigned.",
            publish,
        )
    candidates = [(text, parse_tag_list(text)) for text in texts]
    keys = [(text, tags) for text, tags in candidates if tags is not None and "p" in tags]
    if not keys:
        return CheckResult(
            "DKIM",
            "fail",
            f'{name} holds no DKIM key record ("{texts[0]}"): it needs tags like v=DKIM1; k=...; p=... (RFC 6376 §3.6.1).',
            publish,
        )
    notes = []
    if len(keys) > 1:
        notes.append(f"{len(keys)} key records at one name; verifiers may pick any of them (RFC 6376 §3.6.2.2)")
    text, tags = keys[0]
    if compare is not None:
        # With several records, the one that matches is the one that matters.
        text, tags = next(((t, g) for t, g in keys if compare(t)), keys[0])
    if tags.get("v", "DKIM1") != "DKIM1":
        return CheckResult(
            "DKIM", "fail", f'{name}: "{text}" has v={tags["v"]}, not v=DKIM1 (RFC 6376 §3.6.1).', publish
        )
    if not re.sub(r"\s+", "", tags["p"]):
        return CheckResult(
            "DKIM", "fail", f"{name}: the key is revoked (empty p=, RFC 6376 §3.6.1); every signature fails.", publish
        )
    key_type = tags.get("k", "rsa").lower()
    if key_type not in ("rsa", "ed25519"):
        return CheckResult("DKIM", "fail", f"{name}: unknown key type k={key_type} (RFC 6376 §3.6.1).", publish)
    if compare is not None and not compare(text):
        return CheckResult(
            "DKIM",
            "fail",
            f"{name}: the published key does not match [dkim] private_key, so every signature will fail. "
            f'Published: "{text}".',
            publish,
        )
    if any(flag.strip() == "y" for flag in tags.get("t", "").split(":")):
        notes.append("t=y (testing mode): receivers may treat signed mail as unsigned (RFC 6376 §3.6.1)")
    if dkim_domain != domain and _organizational_domain(dkim_domain) != _organizational_domain(domain):
        notes.append(
            f"the signing domain {dkim_domain} does not align with the From domain {domain}, so DKIM cannot "
            "make DMARC pass (RFC 7489 §3.1.1)"
        )
    matched = "matches [dkim] private_key" if compare is not None else "is published (not compared with a private key)"
    detail = f"{name}: k={key_type} key {matched}"
    if notes:
        return CheckResult("DKIM", "warn", f"{detail}; but {'; '.join(notes)}.", "Fix the points above.")
    return CheckResult("DKIM", "ok", detail + ".")


# ------------------------------------------------------------------ recipients


def _judge_recipient_domain(resolver: dns.resolver.Resolver, domain: str) -> DomainVerdict:
    route = _find_mail_route(resolver, domain)
    if route.error is not None:  # kind "error"
        kind = route.error.error_kind
        if kind == "invalid-name":
            return DomainVerdict(
                domain, "fail", "invalid-name", route.error.error or f"{domain!r} is not a valid domain name"
            )
        return DomainVerdict(domain, "warn", kind or "dns-error", f"unknown: {route.error.error}")
    if route.kind == "mx":
        return DomainVerdict(domain, "ok", "mx", f"MX {', '.join(route.mx_hosts)}", route.mx_hosts)
    if route.kind == "implicit-mx":
        return DomainVerdict(
            domain, "ok", "implicit-mx", f"no MX; mail goes to its address (RFC 5321 §5.1): {route.mx_hosts[0]}"
        )
    if route.kind in ("null-mx", "mixed-null-mx"):
        return DomainVerdict(
            domain, "fail", "null-mx", "the domain publishes a null MX: it accepts no mail (RFC 7505)", route.mx_hosts
        )
    if route.kind == "nxdomain":
        return DomainVerdict(domain, "fail", "nxdomain", "the domain does not exist (NXDOMAIN)")
    return DomainVerdict(domain, "fail", "no-mail-host", "the domain has no MX and no A/AAAA record")


def check_recipient_domains(
    domains: Iterable[str],
    *,
    resolver: dns.resolver.Resolver,
    concurrency: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
    cache: dict[str, DomainVerdict] | None = None,
) -> dict[str, DomainVerdict]:
    """Whether each distinct recipient domain can receive mail.

    MX present: ok; null MX: fail; no MX but an A or AAAA record: ok (implicit MX,
    RFC 5321 §5.1); NXDOMAIN or no address at all: fail; timeout or SERVFAIL: warn
    (unknown). Each distinct domain (compared by :func:`normalize_domain`, which also
    gives the keys of the result) is looked up once, by ``concurrency`` threads.

    ``on_progress(done, total)`` is called from the calling thread after each domain
    (total counts distinct domains not already in ``cache``). ``cache`` may be
    passed to share verdicts between calls within one run; it is filled in.
    """
    cache = {} if cache is None else cache
    wanted: list[str] = []
    seen: set[str] = set()
    for domain in domains:
        key = normalize_domain(domain)
        if key and key not in seen:
            seen.add(key)
            wanted.append(key)
    todo = [d for d in wanted if d not in cache]
    total = len(todo)
    if todo:
        # Lookups wait on the network, not the CPU, so threads overlap them; the
        # dnspython Resolver is safe to share once configured.
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, total)), thread_name_prefix="mailer-dns") as pool:
            futures = {pool.submit(_judge_recipient_domain, resolver, d): d for d in todo}
            for done, future in enumerate(as_completed(futures), start=1):
                domain = futures[future]
                try:
                    cache[domain] = future.result()
                except Exception as exc:  # never let one odd domain abort the whole check
                    cache[domain] = DomainVerdict(domain, "warn", "dns-error", f"unknown: lookup failed: {exc}")
                if on_progress is not None:
                    on_progress(done, total)
    return {d: cache[d] for d in wanted}
