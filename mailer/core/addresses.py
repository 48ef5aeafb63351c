"""The one rule for email addresses: check, normalize, compare.

* :func:`check_address` validates one address (RFC 5321/5322 syntax, IDNA domains)
  and gives its header form and its envelope form.
* :func:`normalize_address` is the key of an address in the send log and the
  suppression list; :func:`address_key` the key for duplicates in one list.
* :func:`idna_twin` gives the other IDNA form of a domain, so that ``bücher.example``
  and ``xn--bcher-kva.example`` find the same suppression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

__all__ = [
    "AddressCheck",
    "address_key",
    "address_problem",
    "check_address",
    "domain_of",
    "idna_twin",
    "normalize_address",
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


def address_key(envelope: str) -> bytes:
    """The duplicate key of an address: the local part as written, the domain lower-cased."""
    local, _, domain = envelope.rpartition("@")
    return f"{local}@{domain.lower()}".encode("utf-8", "surrogatepass")


# --- pure helpers -----------------------------------------------------------------


def normalize_address(address: str) -> str:
    """The key of an address in the send log and the suppression list.

    Surrounding white space is dropped and the domain (after the last ``@``) is
    lower-cased; the local part is kept as written. ``Jane@Example.COM`` gives
    ``Jane@example.com``. A value without ``@`` comes back stripped but otherwise
    unchanged, so invalid rows can be logged under their raw value.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{domain.lower()}"


def domain_of(normalized: str) -> str:
    _local, at, domain = normalized.rpartition("@")
    return domain if at else ""


def idna_twin(normalized: str) -> str | None:
    """The address with its domain in the other IDNA form, or None if it has only one.

    ``ann@bücher.example`` <-> ``ann@xn--bcher-kva.example``: contacts are mailed and
    bounce-suppressed under the ASCII form, while people type the Unicode one into
    ``mailer suppress``; both must find the same suppression.
    """
    local, at, domain = normalized.rpartition("@")
    if not at or (domain.isascii() and "xn--" not in domain):
        return None
    try:
        checked = validate_email(f"x@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    other = (checked.domain if domain.isascii() else checked.ascii_domain).lower()
    return f"{local}@{other}" if other and other != domain else None


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
