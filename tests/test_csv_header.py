"""One rule for a CSV header: the contact reader and the suppression import find the
same delimiter and the same email column in the same file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailer.compose.contacts import Contact, ContactReader
from mailer.core.csv_header import find_email_column, is_email_header, sniff_delimiter
from mailer.store.imports import parse_address_file


@pytest.mark.parametrize(
    "line,delimiter",
    [
        ("email,name", ","),
        ("email;name;city", ";"),
        ("email\tname", "\t"),
        ("email|name", "|"),
        ("email", ","),  # one column
        ("email;first, last;city", ";"),  # the most frequent wins
        ("a,b;c", ","),  # a tie: the earlier delimiter
    ],
)
def test_sniff_delimiter(line, delimiter):
    assert sniff_delimiter(line) == delimiter


@pytest.mark.parametrize(
    "name",
    ["email", "Email", "EMAIL", "E-mail", "E-Mail", "e_mail", "Email Address", "EmailAddress", "mail", " email "],
)
def test_names_of_the_email_column(name):
    assert is_email_header(name)


@pytest.mark.parametrize("name", ["name", "emails", "mailing", "gmail", "address", "e mail x", ""])
def test_names_that_are_not_the_email_column(name):
    assert not is_email_header(name)


def test_find_email_column_takes_the_first_or_the_one_asked_for():
    assert find_email_column(["id", "Mail", "Email"]) == 1
    assert find_email_column(["id", "Mail", "Work Address"], wanted=" work address") == 2
    assert find_email_column(["id", "name"]) is None
    assert find_email_column(["id", "email"], wanted="nosuch") is None


def contacts_of(path: Path) -> list[str]:
    with ContactReader(str(path)) as reader:
        return [item.email for item in reader if isinstance(item, Contact)]


def imported_from(path: Path) -> list[str]:
    return [value for _, value, _ in parse_address_file(path.read_text(), path=path, default_reason=None)]


@pytest.mark.parametrize(
    "text",
    [
        "id,email\n1,ann@example.org\n2,bob@example.org\n",
        "id;E-Mail\n1;ann@example.org\n2;bob@example.org\n",
        "id\tEmail Address\n1\tann@example.org\n2\tbob@example.org\n",
        # These two the suppression import used to refuse ("no email column"): it had
        # its own list of names without e_mail / EmailAddress, and no "|" delimiter.
        "id|EmailAddress|reason\n1|ann@example.org|bounce\n2|bob@example.org|\n",
        "name,e_mail\nAnn,ann@example.org\nBob,bob@example.org\n",
    ],
    ids=["comma", "semicolon", "tab", "pipe", "e_mail"],
)
def test_the_contact_reader_and_the_suppression_import_read_a_file_alike(tmp_path, text):
    path = tmp_path / "list.csv"
    path.write_text(text, encoding="utf-8")
    assert contacts_of(path) == imported_from(path) == ["ann@example.org", "bob@example.org"]
