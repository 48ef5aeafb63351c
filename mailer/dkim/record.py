"""DKIM DNS record text: the tag-list syntax of RFC 6376 section 3.2, and DNS names.

One parser for every tag list mailer reads (DKIM key records, DMARC records).
"""

from __future__ import annotations

import re

from ..core.errors import DKIMError

__all__ = ["check_dns_name", "parse_tag_list"]

_DNS_LABELS = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*$")


# ---------------------------------------------------------------------- helpers


def check_dns_name(value: str, *, what: str, where: str) -> str:
    """Validate a domain or selector and return it in ASCII (A-label) form."""
    text = value.strip().rstrip(".")
    try:
        ascii_text = text.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_text = ""
    if not ascii_text or not _DNS_LABELS.match(ascii_text):
        raise DKIMError(
            f"{what} {value!r} is not a valid DNS name.",
            path=where,
            hint='Use letters, digits, hyphens and dots, for example selector = "mail2026".',
        )
    return ascii_text


def parse_tag_list(text: str) -> dict[str, str] | None:
    """Parse an RFC 6376 §3.2 tag-list (``a=1; b=2``); None when it is malformed."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue  # a trailing ";" is allowed
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name or name in tags:
            return None  # duplicate tags make the record invalid (RFC 6376 §3.2)
        tags[name] = value.strip()
    return tags
