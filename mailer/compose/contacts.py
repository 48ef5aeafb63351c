"""Stream and validate a contact CSV.

The file is read row by row (memory stays flat for any size). Every row ends as
either a :class:`Contact` or a :class:`Rejected` carrying its line number and reason;
nothing is silently dropped. Addresses are checked by :mod:`mailer.core.addresses`;
duplicates are found by the caller with :class:`mailer.compose.seen.SeenAddresses`.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import IO, Any

from jinja2 import TemplateSyntaxError, UndefinedError

from ..core.addresses import check_address
from ..core.csv_header import find_email_column, sniff_delimiter
from ..core.errors import ContactsError, UsageError
from .sandbox import RenderBudget, RenderLimitError, Sandbox, SecurityError, render_deadline

__all__ = ["Contact", "ContactReader", "Rejected", "compile_where", "normalize_identifier"]


def normalize_identifier(header: str) -> str:
    """``"First Name"`` -> ``"first_name"``: a Jinja-friendly variable name for a column."""
    name = re.sub(r"\W+", "_", header.strip().lower()).strip("_")
    if not name:
        return ""
    if name[0].isdigit():
        name = "_" + name
    return name


@dataclass(slots=True)
class Contact:
    """One valid row: its line, its address and its template variables."""

    line: int
    email: str  # for headers (Unicode domain kept when the user wrote one)
    envelope: str  # for SMTP (IDN domain in A-label form)
    smtputf8: bool
    variables: dict[str, Any]


@dataclass(slots=True)
class Rejected:
    """A row that is not mailed, with why. ``kind``: invalid, duplicate, blank, fields."""

    line: int
    kind: str
    reason: str
    email: str = ""


@dataclass
class _Header:
    names: list[str]
    aliases: list[tuple[int, str]] = field(default_factory=list)
    email_index: int = 0


def compile_where(
    expression: str | None, *, columns: list[str], budget: RenderBudget | None = None
) -> Callable[[dict[str, Any]], bool] | None:
    """Compile ``--where`` into a predicate evaluated in Jinja's sandbox (never ``eval``)."""
    if expression is None:
        return None
    if not expression.strip():
        # An unset shell variable (--where "$SEGMENT") must not silently mean everyone.
        raise UsageError(
            "--where is empty, which would select every contact.",
            hint="Give an expression such as --where \"plan == 'pro'\", or leave --where out to mail everyone.",
        )
    budget = budget or RenderBudget()
    env = Sandbox(max_size=budget.max_bytes)
    try:
        compiled = env.compile_expression(expression, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise UsageError(
            f"--where {expression!r} is not a valid expression: {exc.message}.",
            hint="Example: --where \"country == 'DE' and plan in ['pro', 'team']\".",
        ) from None
    except (RecursionError, MemoryError, SyntaxError):
        raise UsageError(
            f"--where {_shown(expression)} is nested too deeply to compile.",
            hint="Write it with fewer nested brackets.",
        ) from None
    seconds = budget.seconds

    def predicate(variables: dict[str, Any]) -> bool:
        try:
            with render_deadline(seconds):
                return bool(compiled(**variables))
        except (RenderLimitError, MemoryError, RecursionError) as exc:
            reason = str(exc) or type(exc).__name__
            raise UsageError(f"--where {_shown(expression)} stopped: {reason}.") from None
        except UndefinedError as exc:
            close = get_close_matches(str(exc).split("'")[1] if "'" in str(exc) else "", columns, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise UsageError(
                f"--where {expression!r}: {exc.message}.{hint}",
                hint=f"The columns are: {', '.join(columns)}.",
            ) from None
        except SecurityError as exc:
            raise UsageError(f"--where {expression!r} is not allowed: {str(exc).rstrip('.')}.") from None
        except Exception as exc:  # a type error in the user's expression, e.g. '<' on str and int
            raise UsageError(f"--where {expression!r} failed on a row: {exc}.") from None

    return predicate


def _shown(expression: str) -> str:
    return repr(expression if len(expression) <= 200 else expression[:200] + "...")


def _spool(stream: IO[bytes]) -> IO[bytes]:
    """Copy ``stream`` into an anonymous-named temporary file, rewound; deleted when closed."""
    spool = tempfile.NamedTemporaryFile(prefix="mailer-stdin-", suffix=".csv")  # noqa: SIM115 - the reader owns it
    try:
        shutil.copyfileobj(stream, spool, 1 << 20)
        spool.flush()
        spool.seek(0)
    except OSError as exc:
        spool.close()
        raise ContactsError(
            f"cannot keep a copy of the contacts read from stdin ({exc.strerror}).",
            path="<stdin>",
            hint="Free some space in the temporary folder (TMPDIR), or pass the contacts as a file.",
        ) from None
    return spool


def _refuse_special_file(source: str) -> None:
    """A FIFO would block at open (or read once), a device (/dev/zero) never end: refuse them."""
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return  # open() says what is wrong
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    raise ContactsError(
        "is not a regular file (a pipe, device or socket).",
        path=source,
        hint="Give a CSV file, or pass - and pipe the contacts on stdin.",
    )


class ContactReader:
    """Reads contacts from a CSV path or ``-`` (stdin), one row at a time.

    ``columns`` and ``variable_names`` are known after construction (the header is
    read at once); iterate to get :class:`Contact` and :class:`Rejected` items.
    """

    def __init__(
        self,
        source: str,
        *,
        email_column: str | None = None,
        stdin: IO[bytes] | None = None,
        spool_stdin: bool = False,
        display_name: str | None = None,
    ) -> None:
        self.source = source
        self.display_name = display_name or ("<stdin>" if source == "-" else source)
        # A path that reads the same rows again (None: stdin that was not spooled).
        self.rereadable: str | None = None if source == "-" else source
        self._spool: IO[bytes] | None = None
        if source == "-":
            self._binary = stdin if stdin is not None else sys.stdin.buffer
            if spool_stdin:
                # Copied to a temporary file first, so that the whole list can be
                # checked before the first message goes, as for a file.
                self._spool = _spool(self._binary)
                self._binary = self._spool
                self.rereadable = self._spool.name
        else:
            _refuse_special_file(source)
            try:
                self._binary = open(source, "rb")  # noqa: SIM115 - closed by close()
            except FileNotFoundError:
                raise ContactsError("contact file not found.", path=source) from None
            except IsADirectoryError:
                raise ContactsError("is a folder, not a CSV file.", path=source) from None
            except OSError as exc:
                raise ContactsError(f"cannot read the contact file ({exc.strerror}).", path=source) from None
        self._line = 0
        self._lines = self._decoded_lines()
        header_line = self._read_header_line()
        self.delimiter = sniff_delimiter(header_line)
        # strict: without it an unclosed quote silently swallows every later row into
        # one field; with it the reader reports the row where the quote opened.
        self._rows = csv.reader(self._chain_first(header_line), delimiter=self.delimiter, strict=True)
        try:
            header = next(self._rows)
        except csv.Error as exc:
            raise ContactsError(f"the header row is not valid CSV: {exc}.", path=self.display_name, line=1) from None
        self._header = self._parse_header(header, email_column)
        self.columns = self._header.names

    @property
    def variable_names(self) -> list[str]:
        """Every name a template may use for a column (headers and identifiers)."""
        return list(dict.fromkeys(self._header.names + [alias for _, alias in self._header.aliases]))

    def close(self) -> None:
        if self.source != "-" or self._spool is not None:
            self._binary.close()  # a spool file is deleted as it closes

    def __enter__(self) -> ContactReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decoded_lines(self) -> Iterator[str]:
        # Decode line by line ourselves so that a bad byte is reported with its line.
        first = True
        for raw in self._binary:
            self._line += 1
            if first:
                first = False
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ContactsError(
                    f"byte {exc.start + 1} of this line is not valid UTF-8 ({raw[exc.start : exc.start + 1]!r}).",
                    path=self.display_name,
                    line=self._line,
                    hint="Re-save the file as UTF-8 (in a spreadsheet: CSV UTF-8), or convert it: "
                    "iconv -f latin1 -t utf-8 old.csv > new.csv.",
                ) from None

    def _read_header_line(self) -> str:
        for text in self._lines:
            if text.strip():
                return text
        raise ContactsError(
            "the contact file is empty: it needs a header row such as 'email,first_name'.", path=self.display_name
        )

    def _chain_first(self, first: str) -> Iterator[str]:
        yield first
        yield from self._lines

    def _parse_header(self, header: list[str], email_column: str | None) -> _Header:
        names = [h.strip() for h in header]
        if any(not n for n in names):
            position = names.index("") + 1
            raise ContactsError(
                f"column {position} of the header has no name.",
                path=self.display_name,
                line=self._line_of_header(),
                hint="Give every column a name in the first row.",
            )
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ContactsError(
                    f"the header names the column {name!r} twice.", path=self.display_name, line=self._line_of_header()
                )
            seen.add(name)
        email_index = find_email_column(names, wanted=email_column or None)
        if email_index is None:
            if email_column:
                raise ContactsError(
                    f"there is no column {email_column!r} (from --email-column).",
                    path=self.display_name,
                    hint=f"The columns are: {', '.join(names)}.",
                )
            raise ContactsError(
                "no email column found.",
                path=self.display_name,
                hint=f"Name one 'email' or pass --email-column. The columns are: {', '.join(names)}.",
            )
        aliases = []
        for index, name in enumerate(names):
            identifier = normalize_identifier(name)
            if identifier and identifier != name and identifier not in names:
                aliases.append((index, identifier))
        return _Header(names=names, aliases=aliases, email_index=email_index)

    def _line_of_header(self) -> int:
        return max(self._line, 1)

    def __iter__(self) -> Iterator[Contact | Rejected]:
        header = self._header
        names = header.names
        width = len(names)
        aliases = header.aliases
        email_index = header.email_index
        for start, row in self._raw_rows():
            if not row or not any(cell.strip() for cell in row):
                yield Rejected(start, "blank", "blank row")
                continue
            if len(row) != width:
                yield Rejected(
                    start,
                    "fields",
                    f"has {len(row)} fields, the header has {width}",
                    row[email_index].strip() if len(row) > email_index else "",
                )
                continue
            raw_email = row[email_index].strip()
            try:
                checked = check_address(raw_email)
            except ValueError as exc:
                yield Rejected(start, "invalid", f"{raw_email!r} is not a valid address ({exc})", raw_email)
                continue
            variables = dict(zip(names, row))
            for index, alias in aliases:
                variables[alias] = row[index]
            variables["email"] = checked.address
            yield Contact(start, checked.address, checked.envelope, checked.smtputf8, variables)

    def scan(self) -> int:
        """Read every row (decoding and CSV syntax only) and return how many there are.

        A real send calls this on a fresh reader first, so that a bad byte or an
        unclosed quote deep in the file stops the run before the first message
        instead of halfway through (exit 2 promises that nothing was sent).
        """
        return sum(1 for _ in self._raw_rows())

    def _raw_rows(self) -> Iterator[tuple[int, list[str]]]:
        """(first line, fields) for every row after the header; bad CSV is a ContactsError."""
        rows = self._rows
        while True:
            start = self._line + 1
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ContactsError(
                    f"this row is not valid CSV: {exc}.",
                    path=self.display_name,
                    line=start,
                    hint="Check for an unclosed quote.",
                ) from None
            yield start, row
