"""Reading contacts: streaming, encodings, delimiters, columns, bad rows, --where, --limit."""

from __future__ import annotations

import io
import json
import time
import tracemalloc

import pytest
from cli_fixtures import assert_fails, dry_run
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.compose.contacts import Contact, ContactReader, Rejected, normalize_identifier
from mailer.compose.seen import SeenAddresses
from mailer.core.addresses import _SIMPLE_ADDRESS, address_key, check_address

TEMPLATE = """\
From: Acme <news@acme.example>
To: {{ email }}
Subject: Hello {{ first_name }}

Hi {{ first_name }}.
"""


def read_all(reader: ContactReader) -> list[Contact | Rejected]:
    with reader:
        return list(reader)


# --- streaming ---------------------------------------------------------------------------


class CountingStream(io.RawIOBase):
    """A binary file that records how many bytes its reader has taken so far."""

    def __init__(self, file) -> None:
        self.file = file
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.file.readinto(buffer)
        self.consumed += count
        return count


def test_a_200k_row_file_is_streamed_in_flat_memory(tmp_path):
    path = tmp_path / "big.csv"
    rows = 200_000
    with open(path, "w", encoding="utf-8") as file:
        file.write("email,first_name\n")
        file.writelines(f"user{i}@example.com,U{i}\n" for i in range(rows))
    size = path.stat().st_size
    row_size = size / (rows + 1)
    started = time.perf_counter()
    window = range(100_000, 120_000)  # tracemalloc slows every allocation ten-fold: watch a window
    peak = None
    with open(path, "rb", buffering=0) as raw:
        stream = CountingStream(raw)
        count = 0
        last = None
        with ContactReader("-", stdin=io.BufferedReader(stream, buffer_size=8192)) as reader:
            for item in reader:
                count += 1
                last = item
                if count % 10_000 == 0:
                    # The reader never runs ahead of the rows it has handed out.
                    assert stream.consumed - count * row_size < 64 * 1024, (count, stream.consumed)
                if count == window.start:
                    tracemalloc.start()
                elif count == window.stop:
                    current, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
    assert count == rows
    assert isinstance(last, Contact) and last.email == f"user{rows - 1}@example.com" and last.line == rows + 1
    # 20,000 rows (~600 kB of CSV) went through while memory stayed flat.
    assert peak is not None and peak < 256 * 1024, f"peak {peak:,} bytes over {len(window):,} rows"
    assert current < 64 * 1024, f"{current:,} bytes still held after {len(window):,} rows"
    assert time.perf_counter() - started < 20


def test_dash_reads_stdin():
    reader = ContactReader("-", stdin=io.BytesIO(b"email,name\na@example.com,Ann\nb@example.com,Bob\n"))
    items = read_all(reader)
    assert reader.display_name == "<stdin>"
    assert [(i.line, i.email, i.variables["name"]) for i in items] == [
        (2, "a@example.com", "Ann"),
        (3, "b@example.com", "Bob"),
    ]


def test_dash_reads_stdin_through_the_cli(project, run_cli):
    project.template(TEMPLATE)
    result, summary, messages = dry_run(
        project, run_cli, contacts="-", input=b"email,First Name\nann@example.com,Ann\nbob@example.com,Bob\n"
    )
    assert result.exit_code == 0, result.stderr
    assert summary["contacts"] == "<stdin>"
    assert [str(m["Subject"]) for m in messages] == ["Hello Ann", "Hello Bob"]


# --- encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["no-bom", "bom"])
def test_utf8_with_and_without_bom(project, run_cli, bom):
    project.csv(bom + "email,First Name\njürgen@example.de,Jürgen\nzoe@example.com,Zoë\n".encode())
    project.template(TEMPLATE)
    reader = ContactReader(str(project.path("contacts.csv")))
    assert reader.columns == ["email", "First Name"]  # no BOM glued to the first column
    items = read_all(reader)
    assert [i.variables["first_name"] for i in items] == ["Jürgen", "Zoë"]
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert [str(m["Subject"]) for m in messages] == ["Hello Jürgen", "Hello Zoë"]


@pytest.mark.parametrize("bad_line", [1, 3])
def test_latin1_file_is_refused_naming_file_line_and_fix(project, run_cli, bad_line):
    lines = ["email,name", "ann@example.com,Ann", "jose@example.com,José", "zoe@example.com,Zoë"]
    if bad_line == 1:
        lines[0] = "email,prénom"
    data = "\n".join(lines).encode("latin-1") + b"\n"
    project.csv(data)
    project.template(TEMPLATE.replace("first_name", "email"))
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, f"contacts.csv:{bad_line}:", "not valid UTF-8", "Re-save the file as UTF-8")


# --- delimiters and columns ---------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
def test_delimiter_is_sniffed(project, run_cli, delimiter):
    city = '"Paris, FR"' if delimiter == "," else "Paris, FR"
    text = f"email{delimiter}First Name{delimiter}city\nann@example.com{delimiter}Ann{delimiter}{city}\n"
    project.csv(text)
    reader = ContactReader(str(project.path("contacts.csv")))
    assert reader.delimiter == delimiter
    (contact,) = read_all(reader)
    assert contact.variables["city"] == "Paris, FR"
    assert contact.variables["first_name"] == "Ann"
    project.template(TEMPLATE.replace("Hi {{ first_name }}.", "Hi {{ first_name }} from {{ city }}."))
    result, _, (message,) = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert "Hi Ann from Paris, FR." in message.get_content()


@pytest.mark.parametrize("header", ["email", "Email", "E-mail", "EMAIL", "e_mail", "Email Address"])
def test_email_column_is_found_case_insensitively(project, header):
    project.csv(f"name,{header}\nAnn,ann@example.com\n")
    (contact,) = read_all(ContactReader(str(project.path("contacts.csv"))))
    assert contact.email == "ann@example.com"
    assert contact.variables["email"] == "ann@example.com"


def test_email_column_option(project, run_cli):
    project.csv("name,Work Address,email\nAnn,ann@work.example,ann@home.example\n")
    (contact,) = read_all(ContactReader(str(project.path("contacts.csv")), email_column="work address"))
    assert contact.email == "ann@work.example"
    project.template(TEMPLATE.replace("first_name", "name"))
    result, _, (message,) = dry_run(project, run_cli, "--email-column", "Work Address")
    assert result.exit_code == 0, result.stderr
    assert message["To"].addresses[0].addr_spec == "ann@work.example"
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--email-column", "mobile")
    assert_fails(result, 2, "contacts.csv", "'mobile'", "name, Work Address, email")


def test_missing_email_column_lists_the_columns(project, run_cli):
    project.csv("name,phone,city\nAnn,123,Paris\n")
    project.template(TEMPLATE)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "contacts.csv", "no email column", "--email-column", "name, phone, city")
    assert result.stdout == ""


def test_header_whitespace_is_stripped_and_identifiers_are_derived(project, run_cli):
    project.csv(" email , First Name ,Plan Type,2nd-line\nann@example.com,Ann,pro,x\n")
    reader = ContactReader(str(project.path("contacts.csv")))
    assert reader.columns == ["email", "First Name", "Plan Type", "2nd-line"]
    assert {"first_name", "plan_type", "_2nd_line"} <= set(reader.variable_names)
    (contact,) = read_all(reader)
    assert contact.variables["First Name"] == contact.variables["first_name"] == "Ann"
    project.template(TEMPLATE.replace("Hi {{ first_name }}.", "Hi {{ first_name }}, {{ plan_type }}, {{ _2nd_line }}."))
    result, _, (message,) = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert "Hi Ann, pro, x." in message.get_content()


def test_normalize_identifier():
    assert normalize_identifier("First Name") == "first_name"
    assert normalize_identifier("  E-Mail  ") == "e_mail"
    assert normalize_identifier("Prénom") == "prénom"
    assert normalize_identifier("2024 total") == "_2024_total"
    assert normalize_identifier("!!!") == ""


@pytest.mark.parametrize(
    "header, problem",
    [("email,,name", "column 2 of the header has no name"), ("email,name,Name ,name", "twice")],
)
def test_bad_headers_are_refused(project, run_cli, header, problem):
    project.csv(header + "\nann@example.com,a,b,c\n")
    project.template(TEMPLATE)
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "contacts.csv:1:", problem)


def test_empty_file_is_refused(project, run_cli):
    project.csv("\n\n")
    project.template(TEMPLATE)
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "contacts.csv", "empty", "header row")


def test_missing_contact_file(project, run_cli):
    project.template(TEMPLATE)
    assert_fails(run_cli("send", "nope.csv", "mail.txt.j2", "--dry-run"), 2, "nope.csv", "not found")


def test_unclosed_quote_is_reported_not_swallowing_later_rows(project, run_cli):
    project.csv('email,name\nann@example.com,"Ann\nbob@example.com,Bob\ncy@example.com,Cy\n')
    project.template(TEMPLATE.replace("first_name", "email"))
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--format", "jsonl")
    assert_fails(result, 2, "contacts.csv:2:", "not valid CSV", "unclosed quote")


def test_text_after_a_closing_quote_is_reported(project, run_cli):
    project.csv('email,name\nann@example.com,"Ann" Lee\n')
    project.template(TEMPLATE.replace("first_name", "name"))
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--format", "jsonl")
    assert_fails(result, 2, "contacts.csv:2:", "not valid CSV")


# --- bad rows -----------------------------------------------------------------------------

MESSY = (
    "email,First Name,plan\n"  # 1
    "ann@Example.COM,Ann,pro\n"  # 2  ok (domain lower-cased)
    "bob@example.com,Bob\n"  # 3  too few fields
    "\n"  # 4  blank
    "jane@,Jane,pro\n"  # 5  invalid
    "ANN@example.com,Ann again,pro\n"  # 6  duplicate of line 2: case is ignored, local part included
    "ann@example.com,Ann twice,pro\n"  # 7  duplicate of line 2
    "kai@bücher.example,Kai,team\n"  # 8  IDN domain: valid
    'lee@example.com,"Lee\n'  # 9  a quoted field over two lines
    'Second",pro\n'  # 10
    "max@example.com,Max,pro,extra\n"  # 11 too many fields
    " , ,\n"  # 12 blank (only white space)
    "not an address,Nope,pro\n"  # 13 invalid
)


def test_bad_rows_are_reported_with_lines_skipped_and_counted(project, run_cli):
    project.csv(MESSY)
    project.template(TEMPLATE.replace("Subject: Hello {{ first_name }}", "Subject: Hello"))
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1
    assert summary["exit_code"] == 1
    assert summary["counts"] == {
        "rows": 11,
        "rendered": 3,
        "fields": 2,
        "blank": 2,
        "invalid": 2,
        "duplicate": 2,
    }
    problems = {(p["line"], p["kind"]) for p in summary["problems"]}
    assert problems == {
        (3, "fields"),
        (4, "blank"),
        (5, "invalid"),
        (6, "duplicate"),
        (7, "duplicate"),
        (11, "fields"),
        (12, "blank"),
        (13, "invalid"),
    }
    by_line = {p["line"]: p for p in summary["problems"]}
    assert "line 2" in by_line[7]["reason"]
    assert "jane@" in by_line[5]["reason"]
    assert "has 2 fields, the header has 3" in by_line[3]["reason"]
    assert "has 4 fields, the header has 3" in by_line[11]["reason"]
    assert [m["To"].addresses[0].addr_spec for m in messages] == [
        "ann@example.com",
        "kai@xn--bcher-kva.example",
        "lee@example.com",
    ]
    assert "Hi Lee\nSecond." in messages[2].get_content().replace("\r\n", "\n")  # a newline in the body is fine
    # Every skipped row is named on stderr with its file and line.
    for line in (3, 5, 6, 7, 11, 13):
        assert f"contacts.csv:{line}:" in result.stderr


def test_idn_domain_is_accepted_and_encoded_for_the_envelope(project, run_cli):
    project.csv("email,First Name\nkai@Bücher.example,Kai\n")
    project.template(TEMPLATE)
    (contact,) = read_all(ContactReader(str(project.path("contacts.csv"))))
    assert contact.envelope == "kai@xn--bcher-kva.example"
    assert contact.email == "kai@bücher.example"
    assert not contact.smtputf8
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["recipients"] == ["kai@xn--bcher-kva.example"]


@pytest.mark.parametrize(
    "value, reason",
    [
        ("jane@", "after the @"),
        ("jane.example.com", "@"),
        ("a@b@example.com", "@"),
        ("jane@example..com", "period"),
        ("x@localhost.test", "special-use"),
    ],
)
def test_check_address_refuses_with_a_reason(value, reason):
    with pytest.raises(ValueError, match=reason):
        check_address(value)


def test_check_address_normalizes():
    assert check_address("  Ann@Example.COM ").address == "Ann@example.com"
    idn = check_address("kai@bücher.example")
    assert (idn.address, idn.envelope, idn.smtputf8) == ("kai@bücher.example", "kai@xn--bcher-kva.example", False)
    utf8 = check_address("jürgen@example.de")
    assert utf8.smtputf8 and utf8.envelope == "jürgen@example.de"


def test_address_key_ignores_case_in_the_local_part_and_the_domain():
    assert address_key("a@X.com") == address_key("a@x.com") == address_key("A@x.com")
    assert address_key("a@x.com") != address_key("b@x.com")


# --- the fast path is a subset of the validator -------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.from_regex(_SIMPLE_ADDRESS, fullmatch=True).filter(lambda address: len(address) <= 254))
def test_the_fast_address_pattern_accepts_only_what_the_validator_accepts(address):
    try:
        result = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:  # pragma: no cover - the failure being tested for
        pytest.fail(f"_SIMPLE_ADDRESS accepts {address!r}, the validator does not: {exc}")
    checked = check_address(address)
    assert checked.envelope == result.ascii_email
    assert checked.address == result.normalized


@pytest.mark.parametrize(
    "address", ["a@ab--cd.example", "a@xn--zz.example", "a@mail.test", "a@x.localhost", "a@x.onion"]
)
def test_the_fast_pattern_leaves_hard_cases_to_the_validator(address):
    assert not _SIMPLE_ADDRESS.fullmatch(address)
    with pytest.raises(ValueError):
        check_address(address)


# --- SeenAddresses --------------------------------------------------------------------------


def test_seen_addresses_grow_and_remember_the_first_line():
    seen = SeenAddresses(capacity=4)
    total = 50_000
    for index in range(total):
        assert seen.add(f"user{index}@example.com".encode(), index + 2) is None
    assert len(seen) == total
    for index in range(0, total, 7):
        assert seen.add(f"user{index}@example.com".encode(), 999_999) == index + 2
    assert len(seen) == total
    assert seen.add(b"someone-new@example.com", 5) is None
    assert len(seen) == total + 1


def test_seen_addresses_give_the_same_answers_once_spilled_to_disk():
    seen = SeenAddresses(capacity=4, spill_at=1000)
    total = 5000
    for index in range(total):
        assert seen.add(f"user{index}@example.com".encode(), index + 2) is None
        if index == 998:
            assert seen._disk is None
    assert seen._disk is not None  # past 1,000 addresses the table is on disk
    assert len(seen) == total
    # Addresses from before and after the spill: found with their first line.
    for index in (0, 500, 999, 1000, 4999):
        assert seen.add(f"user{index}@example.com".encode(), 999_999) == index + 2
        assert seen.get(f"user{index}@example.com".encode()) == index + 2
    assert seen.get(b"nobody@example.com") is None
    assert seen.add(b"nobody@example.com", 7) is None and len(seen) == total + 1
    seen.close()


def test_seen_addresses_memory_stays_flat_past_the_spill():
    """The in-memory table stops growing at ``spill_at`` addresses."""
    keys = [f"user{index}@example.com".encode() for index in range(60_000)]
    tracemalloc.start()
    try:
        seen = SeenAddresses(spill_at=10_000)
        peaks = []
        for line, key in enumerate(keys, start=2):
            seen.add(key, line)
            if line % 20_000 == 0:
                peaks.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(seen) == 60_000
    # 20,000 then 60,000 addresses: the same memory, give or take SQLite's small cache.
    assert peaks[-1] - peaks[0] < 512 * 1024, peaks
    seen.close()


def test_seen_addresses_with_address_keys():
    seen = SeenAddresses()
    assert seen.add(address_key("a@X.com").encode(), 2) is None
    assert seen.add(address_key("A@x.com").encode(), 9) == 2
    assert seen.add(address_key("b@x.com").encode(), 10) is None


# --- --where and --limit ------------------------------------------------------------------

SEGMENTS = (
    "email,First Name,country,plan\n"
    "a@example.com,A,DE,pro\n"
    "b@example.com,B,DE,free\n"
    "c@example.com,C,FR,pro\n"
    "d@example.com,D,DE,team\n"
    "e@example.com,E,AT,team\n"
)


def test_where_selects_with_a_jinja_expression(project, run_cli):
    project.csv(SEGMENTS)
    project.template(TEMPLATE)
    result, summary, messages = dry_run(project, run_cli, "--where", "country == 'DE' and plan in ['pro','team']")
    assert result.exit_code == 0, result.stderr
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["a@example.com", "d@example.com"]
    assert summary["counts"]["filtered"] == 3
    assert summary["counts"]["rendered"] == 2


@pytest.mark.parametrize(
    "expression",
    [
        "().__class__.__bases__[0].__subclasses__()",
        "''.__class__.__mro__[1].__subclasses__() | length > 0",
        "cycler.__init__.__globals__.os.system('touch pwned') == 0",
        "email.__class__.__base__.__subclasses__()",
    ],
)
def test_where_refuses_sandbox_escapes(project, run_cli, expression):
    project.csv(SEGMENTS)
    project.template(TEMPLATE)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", expression)
    assert_fails(result, 2, "--where", "not allowed")
    assert result.stdout == ""
    assert not project.path("pwned").exists()


def test_where_with_invalid_syntax(project, run_cli):
    project.csv(SEGMENTS)
    project.template(TEMPLATE)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", "country == ")
    assert_fails(result, 2, "--where", "not a valid expression", "Example:")
    assert result.stdout == ""


def test_where_with_an_unknown_name_suggests_a_column(project, run_cli):
    project.csv(SEGMENTS)
    project.template(TEMPLATE)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", "contry == 'DE'")
    assert_fails(result, 2, "'contry' is undefined", "Did you mean country?", "email, First Name, country, plan")
    assert result.stdout == ""


def test_limit_handles_at_most_n_messages(project, run_cli):
    project.csv(SEGMENTS)
    project.template(TEMPLATE)
    result, summary, messages = dry_run(project, run_cli, "--limit", "2")
    assert result.exit_code == 0, result.stderr
    assert len(messages) == 2
    assert summary["counts"]["rendered"] == 2
    assert summary["counts"]["over_limit"] == 3
    result, summary, messages = dry_run(project, run_cli, "--limit", "1", "--where", "plan == 'team'")
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["d@example.com"]
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--limit", "-1")
    assert_fails(result, 2, "--limit")


def test_seen_addresses_stay_compact():
    """About 24 bytes per address (docstring), far below a set of strings (~100)."""
    total = 65_000  # just under a doubling: 131,072 slots
    keys = [f"user{index}@example.com".encode() for index in range(total)]
    tracemalloc.start()
    try:
        seen = SeenAddresses()
        for line, key in enumerate(keys, start=2):
            seen.add(key, line)
        current = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(seen) == total
    assert current / total < 28, f"{current / total:.1f} bytes per address"


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_as_the_contact_file_is_refused(project, run_cli, kind):
    import os

    project.template("From: a@acme.example\nSubject: Hi\n\nHi.\n")
    if kind == "fifo":
        os.mkfifo(project.path("contacts.csv"))
        name = "contacts.csv"
    else:
        name = "/dev/zero"
    result = run_cli("send", name, "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, name, "not a regular file", "stdin")
    assert result.stdout == ""
