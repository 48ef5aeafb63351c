"""The one rule for email addresses: check, normalize, compare.

* :func:`check_address` validates one address (RFC 5321/5322 syntax, IDNA domains)
  and gives its header form and its envelope form.
* :func:`address_key` is the one key by which addresses are compared: duplicates in
  a list, resume (the send log) and the suppression list. The local part's case does
  not count (Unicode case folding), nor does the form of an internationalized domain.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

__all__ = [
    "AddressCheck",
    "address_key",
    "address_problem",
    "check_address",
    "display_domain",
    "domain_of",
]


# A conservative subset of valid addresses: plain ASCII dot-atom local part, LDH
# domain labels and an alphabetic TLD. Addresses that match skip the full validator
# (about 50 µs each); a property test checks that the validator accepts all of them.
# Like the validator, it refuses labels with "--" in 3rd and 4th place (RFC 5891
# §4.2.3.1: reserved, or Punycode that only IDNA can check) and special-use domains
# such as .test and .localhost (RFC 6761), which can receive no mail.
_SIMPLE_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?!(?:.*\.)?(?i:" + "|".join(re.escape(name) for name in SPECIAL_USE_DOMAIN_NAMES) + r")$)"
    r"(?:(?!..--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


@dataclass(frozen=True)
class AddressCheck:
    """A validated address: ``address`` for headers, ``envelope`` for SMTP."""

    address: str
    envelope: str
    smtputf8: bool


def check_address(value: str) -> AddressCheck:
    """Validate one address; raise ``ValueError`` with a human reason if it is not valid.

    Internationalized domains are converted to their ASCII (A-label) form for the
    envelope; a non-ASCII local part needs SMTPUTF8 and is flagged.
    """
    value = value.strip()
    if len(value) <= 254 and _SIMPLE_ADDRESS.fullmatch(value):
        local, _, domain = value.rpartition("@")
        address = f"{local}@{domain.lower()}"
        return AddressCheck(address, address, False)
    if not value:
        raise ValueError("the address is empty")
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    envelope = result.ascii_email or f"{result.local_part}@{result.ascii_domain}"
    return AddressCheck(result.normalized, envelope, bool(result.smtputf8))


def address_key(address: str) -> str:
    """The one key by which two addresses are the same person: duplicates in a list,
    resume (the send log's recipient key) and the suppression list.

    Surrounding white space is dropped; the local part is compared without case
    (Unicode case folding, ``str.casefold``, in NFC), because every large mailbox
    provider treats ``Ann@x.org`` and ``ann@x.org`` as one mailbox, and mailing someone
    twice, or after they opted out, is the worse mistake (RFC 5321 2.4 lets a server
    tell them apart; none of the large ones does). The domain is lower-cased and an
    internationalized one taken in its ASCII form, so ``ann@bücher.example`` and
    ``ann@xn--bcher-kva.example`` are one key. A value without ``@`` (the raw value of
    a bad row) is stripped and case-folded. Messages still go to the address as written.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() if address.isascii() else _fold(address)
    # For ASCII, lower() is what casefold() gives, at a third of its cost.
    local = local.lower() if local.isascii() else _fold(local)
    if domain.isascii():
        return f"{local}@{domain.lower()}"
    return f"{local}@{_ascii_domain(domain)}"


def _fold(text: str) -> str:
    # Canonical caseless matching (Unicode 3.13, D145): NFD, fold, NFD; kept in NFC.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


@functools.lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    """The A-label form of an internationalized domain (lower case), else the domain folded."""
    try:
        checked = validate_email(f"x@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return _fold(domain)
    return (checked.ascii_domain or _fold(domain)).lower()


def domain_of(key: str) -> str:
    """The domain of an address key (after the last ``@``), or "" when there is none."""
    _local, at, domain = key.rpartition("@")
    return domain if at else ""


def display_domain(domain: str) -> str:
    """A domain as its users write it: ``xn--bcher-kva.example`` -> ``bücher.example``."""
    if "xn--" not in domain:
        return domain
    try:
        return domain.encode("ascii").decode("idna")
    except UnicodeError:
        return domain


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a syntactically valid email address, or None if it is.

    The same rule as the contacts reader (no DNS lookups): every address mailer can
    mail can be suppressed, including hard bounces at internal domains (``.local``).
    """
    if not address.strip():
        return "the address is empty"
    try:
        check_address(address)
    except ValueError as exc:
        return str(exc)
    return None
