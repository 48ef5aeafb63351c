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


# RFC 6376 §3.2: tag-name = ALPHA *ALNUMPUNC; a value is VALCHARs (printable ASCII but
# ";") in runs separated by white space; white space (WSP, and FWS: CRLF then WSP)
# around names, "=" and values is not part of them.
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_TAG_VALUE = re.compile(r"(?:[\x21-\x3a\x3c-\x7e]+(?:[ \t]+[\x21-\x3a\x3c-\x7e]+)*)?")
_FOLDING = re.compile(r"\r?\n(?=[ \t])")


def parse_tag_list(text: str, *, fold_names: bool = False) -> dict[str, str] | None:
    """Parse an RFC 6376 §3.2 tag-list (``v=DKIM1; k=rsa; p=...``); None when it is malformed.

    Names are case-sensitive, as DKIM wants; ``fold_names`` lower-cases them (DMARC
    records, RFC 7489 §6.4, whose ABNF names are case-insensitive). A value may be
    empty (``p=``) and keeps its inner white space (a folding line break goes, the
    white space after it stays); one trailing ``;`` is allowed. A duplicate name
    makes the whole list invalid, as does an empty tag-spec (``a=1;;b=2``), a name
    that is not ALPHA *(ALPHA / DIGIT / "_"), a spec without ``=``, or a character
    outside printable ASCII in a value.
    """
    unfolded = _FOLDING.sub("", text)
    specs = unfolded.split(";")
    if len(specs) > 1 and not specs[-1].strip(" \t"):
        specs.pop()  # the optional trailing ";"
    tags: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip(" \t")
        value = value.strip(" \t")
        if not sep or not _TAG_NAME.fullmatch(name) or not _TAG_VALUE.fullmatch(value):
            return None
        if fold_names:
            name = name.lower()
        if name in tags:
            return None  # RFC 6376 §3.2: the entire tag-list is invalid
        tags[name] = value
    return tags
