"""Tests of mailer.core.addresses.address_key: the one rule by which addresses are compared."""

from __future__ import annotations

import pytest

from mailer.core.addresses import address_key


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("good@example.org", "GOOD@EXAMPLE.ORG"),
        ("Jane.Doe@Example.COM", "jane.doe@example.com"),
        ("  ann@x.org\t", "ann@x.org"),
        ("ÄNN@x.org", "änn@x.org"),  # Unicode case folding, not only ASCII
        ("A\u0308nn@x.org", "änn@x.org"),  # decomposed and composed umlaut
        ("STRASSE@x.org", "straße@x.org"),  # full case folding: ß folds to ss
        ("ann@bücher.example", "ann@xn--bcher-kva.example"),  # either IDNA form
        ("Ann@BÜCHER.example", "ann@XN--BCHER-KVA.example"),
    ],
)
def test_addresses_that_are_one_person_have_one_key(one: str, other: str) -> None:
    assert address_key(one) == address_key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [("ann@x.org", "anne@x.org"), ("ann@x.org", "ann@x.com"), ("änn@x.org", "ann@x.org")],
)
def test_different_addresses_keep_different_keys(one: str, other: str) -> None:
    assert address_key(one) != address_key(other)


def test_the_key_is_lower_case_ascii_domain_and_folded_local_part() -> None:
    assert address_key("ÄNN@Bücher.Example") == "änn@xn--bcher-kva.example"
    assert address_key("Not An Address") == "not an address"  # a bad row's raw value
    assert address_key(address_key("ÄNN@Bücher.Example")) == address_key("ÄNN@Bücher.Example")
