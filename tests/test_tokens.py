"""Signed tokens (mailer.core.tokens): URL tokens carry the recipient encrypted and
authenticated, VERP tokens are short lower-case references with a MAC; both verify with
previous keys and refuse everything altered, truncated, forged or of another kind."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.core.errors import ExitCode
from mailer.core.tokens import (
    VERP_TOKEN_LENGTH,
    TokenClaims,
    TokenKind,
    TokenSigner,
    WebSecretError,
    parse_verp_token,
    recipient_tag,
)

SECRET = "k" * 40
OLD_SECRET = "o" * 40
OTHER_SECRET = "x" * 40


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(SECRET)


def test_url_tokens_round_trip_and_are_deterministic(signer: TokenSigner) -> None:
    token = signer.unsubscribe_token("spring", "Jane.Doe@Example.com")
    assert token == signer.unsubscribe_token("spring", "Jane.Doe@Example.com")
    assert signer.verify(token, TokenKind.UNSUBSCRIBE) == TokenClaims(
        TokenKind.UNSUBSCRIBE, "spring", "Jane.Doe@Example.com"
    )
    opened = signer.open_token("spring", "jane@example.com")
    assert signer.verify(opened, TokenKind.OPEN) == TokenClaims(TokenKind.OPEN, "spring", "jane@example.com")
    click = signer.click_token("spring", "jane@example.com", "https://shop.example/a?b=c&d=é")
    assert signer.verify(click, TokenKind.CLICK) == TokenClaims(
        TokenKind.CLICK, "spring", "jane@example.com", "https://shop.example/a?b=c&d=é"
    )
    # A fresh signer with the same key (another process, a dry run) verifies it too.
    assert TokenSigner(SECRET).verify(token, TokenKind.UNSUBSCRIBE) is not None


def test_no_address_in_the_token_in_any_encoding(signer: TokenSigner) -> None:
    address = "jane.doe@example.com"
    token = signer.unsubscribe_token("spring", address)
    assert all(c.isalnum() or c in "-_" for c in token)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for needle in (b"jane", b"example", b"spring"):
        assert needle not in raw
        assert needle.decode() not in token.lower()
    for encoded in (
        base64.b64encode(address.encode()),
        base64.b32encode(address.encode()),
        address.encode().hex().encode(),
    ):
        assert encoded.decode().lower()[:8] not in token.lower()
    # Two recipients' tokens differ everywhere, not in a readable part.
    other = signer.unsubscribe_token("spring", "jane.dof@example.com")
    assert other != token
    assert len(token) < 100


def test_kind_is_authenticated(signer: TokenSigner) -> None:
    opened = signer.open_token("spring", "jane@example.com")
    assert signer.verify(opened, TokenKind.UNSUBSCRIBE) is None
    assert signer.verify(opened, TokenKind.CLICK) is None
    unsubscribe = signer.unsubscribe_token("spring", "jane@example.com")
    assert signer.verify(unsubscribe, TokenKind.OPEN) is None


def test_altered_truncated_and_forged_tokens_fail(signer: TokenSigner) -> None:
    token = signer.click_token("spring", "jane@example.com", "https://shop.example/")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for position in range(len(token)):
        replacement = alphabet[(alphabet.index(token[position]) + 1) % 64]
        altered = token[:position] + replacement + token[position + 1 :]
        assert signer.verify(altered, TokenKind.CLICK) is None, position
    for length in range(len(token)):
        assert signer.verify(token[:length], TokenKind.CLICK) is None
    for hostile in ("", "=", "..", "a" * 9000, token + "=", token + "A", " " + token, token.upper(), "%00", "\x00"):
        assert signer.verify(hostile, TokenKind.CLICK) is None
    # Another key's token, built the same way, is a forgery here.
    forged = TokenSigner(OTHER_SECRET).click_token("spring", "jane@example.com", "https://evil.example/")
    assert signer.verify(forged, TokenKind.CLICK) is None


def test_target_url_cannot_be_swapped(signer: TokenSigner) -> None:
    one = signer.click_token("spring", "jane@example.com", "https://shop.example/")
    two = signer.click_token("spring", "jane@example.com", "https://evil.example/")
    raw_one = base64.urlsafe_b64decode(one + "=" * (-len(one) % 4))
    raw_two = base64.urlsafe_b64decode(two + "=" * (-len(two) % 4))
    # Splicing the tail of one onto the head of another does not verify.
    spliced = base64.urlsafe_b64encode(raw_one[:20] + raw_two[20:]).rstrip(b"=").decode()
    assert signer.verify(spliced, TokenKind.CLICK) is None


def test_key_rotation() -> None:
    old = TokenSigner(OLD_SECRET)
    token = old.unsubscribe_token("spring", "jane@example.com")
    verp = old.verp_token("spring", "jane@example.com")
    rotated = TokenSigner(SECRET, [OLD_SECRET])
    assert rotated.verify(token, TokenKind.UNSUBSCRIBE) == TokenClaims(
        TokenKind.UNSUBSCRIBE, "spring", "jane@example.com"
    )
    assert rotated.resolve_verp(verp, [("spring", "jane@example.com")]) == ("spring", "jane@example.com")
    # New tokens are signed with the new key only.
    fresh = rotated.unsubscribe_token("spring", "jane@example.com")
    assert fresh != token
    assert old.verify(fresh, TokenKind.UNSUBSCRIBE) is None
    assert TokenSigner(SECRET).verify(fresh, TokenKind.UNSUBSCRIBE) is not None
    # Once the old key is dropped from the list, its tokens stop verifying.
    assert TokenSigner(SECRET).verify(token, TokenKind.UNSUBSCRIBE) is None
    assert TokenSigner(SECRET).resolve_verp(verp, [("spring", "jane@example.com")]) is None


def test_verp_token_shape_and_case_folding(signer: TokenSigner) -> None:
    token = signer.verp_token("spring", "Jane@Example.com")
    assert len(token) == VERP_TOKEN_LENGTH
    assert token == token.lower()
    assert all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in token)
    assert len(f"bounces+{token}") <= 64
    # The same person in another spelling has the same token (address_key).
    assert signer.verp_token("spring", "jane@example.com") == token
    parsed = parse_verp_token(token.upper())  # a relay that upper-cased the local part
    assert parsed is not None
    assert parsed[0] == recipient_tag("jane@example.com")
    rows = [("autumn", "jane@example.com"), ("spring", "jane@example.com")]
    assert signer.resolve_verp(token.upper(), rows) == ("spring", "jane@example.com")


def test_verp_token_of_another_campaign_or_recipient_fails(signer: TokenSigner) -> None:
    token = signer.verp_token("spring", "jane@example.com")
    assert signer.resolve_verp(token, [("autumn", "jane@example.com")]) is None
    assert signer.resolve_verp(token, [("spring", "john@example.com")]) is None
    assert signer.resolve_verp(token, []) is None
    for position in range(len(token)):
        replacement = "a" if token[position] != "a" else "b"
        altered = token[:position] + replacement + token[position + 1 :]
        assert signer.resolve_verp(altered, [("spring", "jane@example.com")]) is None
    for hostile in ("", token[:-1], token + "a", "1" * 32, "jane@example.com", token[:16] + "=" * 16):
        assert (
            parse_verp_token(hostile) is None or signer.resolve_verp(hostile, [("spring", "jane@example.com")]) is None
        )
    assert TokenSigner(OTHER_SECRET).resolve_verp(token, [("spring", "jane@example.com")]) is None


@settings(max_examples=60, deadline=None)
@given(
    campaign=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40),
    address=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=60),
    url=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=200),
)
def test_round_trip_any_text(campaign: str, address: str, url: str) -> None:
    signer = TokenSigner(SECRET)
    address = address.strip() or "x"
    claims = signer.verify(signer.click_token(campaign, address, url), TokenKind.CLICK)
    assert claims == TokenClaims(TokenKind.CLICK, campaign, address, url)
    assert signer.verify(signer.unsubscribe_token(campaign, address), TokenKind.UNSUBSCRIBE) == TokenClaims(
        TokenKind.UNSUBSCRIBE, campaign, address
    )


def test_nul_is_refused_when_minting(signer: TokenSigner) -> None:
    with pytest.raises(ValueError):
        signer.unsubscribe_token("spr\x00ing", "jane@example.com")
    with pytest.raises(ValueError):
        signer.click_token("spring", "jane@example.com", "https://x.example/\x00")


def test_secret_from_the_environment() -> None:
    signer = TokenSigner.from_environment(environ={"MAILER_WEB_SECRET": SECRET})
    assert signer.verify(TokenSigner(SECRET).open_token("c", "a@b.example"), TokenKind.OPEN) is not None
    with pytest.raises(WebSecretError) as unset:
        TokenSigner.from_environment("ACME_WEB_KEY", environ={})
    assert "ACME_WEB_KEY is not set" in str(unset.value)
    assert unset.value.exit_code == ExitCode.USAGE
    with pytest.raises(WebSecretError) as short:
        TokenSigner.from_environment(environ={"MAILER_WEB_SECRET": "hunter2-hunter2"})
    assert "MAILER_WEB_SECRET" in str(short.value)
    assert "hunter2" not in str(short.value)
    # Previous keys: unset ones are skipped (rotation over), short ones refused.
    rotated = TokenSigner.from_environment(
        previous_envs=["OLD_KEY", "OLDER_KEY"], environ={"MAILER_WEB_SECRET": SECRET, "OLD_KEY": OLD_SECRET}
    )
    assert rotated.verify(TokenSigner(OLD_SECRET).open_token("c", "a@b.example"), TokenKind.OPEN) is not None
    with pytest.raises(WebSecretError) as weak_old:
        TokenSigner.from_environment(previous_envs=["OLD_KEY"], environ={"MAILER_WEB_SECRET": SECRET, "OLD_KEY": "x"})
    assert "OLD_KEY" in str(weak_old.value)
