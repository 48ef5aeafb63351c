"""The header row of a CSV file mailer reads: its delimiter and its email column.

One rule for the contact list (:mod:`mailer.compose.contacts`) and the suppression
import (:mod:`mailer.store.imports`), so that a file one of them accepts the other
reads the same way. Pure functions over text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["DELIMITERS", "find_email_column", "is_email_header", "sniff_delimiter"]

#: The delimiters spreadsheets write ("," and, in locales with a decimal comma, ";"),
#: and the tab and "|" of database exports; the first is the default.
DELIMITERS = (",", ";", "\t", "|")

# Header names, once lower-cased and stripped of spaces, "_" and "-", that name the
# address column: email, E-mail, Email Address, e_mail, mail...
_EMAIL_NAMES = frozenset({"email", "emailaddress", "mail"})


def sniff_delimiter(header_line: str) -> str:
    """The delimiter that occurs most often in the header line (ties: the earlier in
    :data:`DELIMITERS`); ``","`` for a line with none (a single column)."""
    counts = {delimiter: header_line.count(delimiter) for delimiter in DELIMITERS}
    best = max(DELIMITERS, key=counts.__getitem__)
    return best if counts[best] else ","


def is_email_header(name: str) -> bool:
    """Whether a header cell names the address column (any case, spacing, _ or -)."""
    return re.sub(r"[\s_-]", "", name.lower()) in _EMAIL_NAMES


def find_email_column(names: Sequence[str], *, wanted: str | None = None) -> int | None:
    """The index of the address column: the one named ``wanted`` (any case), else the
    first that :func:`is_email_header` accepts; None when there is none."""
    if wanted is not None:
        key = wanted.strip().lower()
        return next((index for index, name in enumerate(names) if name.strip().lower() == key), None)
    return next((index for index, name in enumerate(names) if is_email_header(name)), None)
