"""Signed tokens: the links of ``mailer serve`` and the VERP envelope senders.

Two formats, both signed with the key in the variable that ``[web] secret_env`` names
(``MAILER_WEB_SECRET`` by default); the keys of ``[web] previous_secret_envs`` still
verify but sign nothing new, so a key can be rotated while old mail is still read.

**URL tokens** (``/u/<token>``, ``/o/<token>``, ``/c/<token>``) are stateless, so the
tokens of a dry run verify too, and carry the recipient *encrypted*: no address appears
in a URL in any encoding (PRODUCT.md). A token is::

    base64url_nopad( 0x01 || AES-SIV(key_url, plaintext, ad=["mailer/url/1", kind]) )
    plaintext = campaign UTF-8 || 0x00 || address UTF-8 [ || 0x00 || target URL UTF-8 ]

``kind`` is ``u`` (unsubscribe), ``o`` (open) or ``c`` (click, which also signs the
target URL: the redirect goes only there). AES-SIV (RFC 5297) is deterministic and
misuse-resistant: the same recipient gets the same token in every message and run,
which is fine — equality is all it leaks — and its 16-byte tag authenticates all of it,
kind included, so an open token does not unsubscribe. ``key_url`` is 64 bytes from
HKDF-SHA256 of the secret. About 1.5 µs to mint or verify one (the click-tracking
builder mints one per link per message). A token of an address of 25 characters and a
campaign of 15 is about 80 characters.

**VERP tokens** go into an envelope sender (``bounces+<token>@example.com``), where they
must survive case folding (some relays lower-case local parts) and stay short (a local
part holds 64 octets). A bounce only ever comes for a logged send, so the token is a
*reference* resolved through the send log rather than a self-contained record::

    lowercase_base32_nopad( recipient_tag (8 bytes) || mac (12 bytes) )     -> 32 characters
    recipient_tag = BLAKE2b-64(address_key(address))          (indexed in the send log)
    mac = HMAC-SHA256(key_verp, "mailer/verp/1" || 0x00 || campaign || 0x00 || address_key)[:12]

The tag finds the rows of that address (in every campaign); the 96-bit MAC picks the
campaign and proves that mailer minted the token. The tag is a plain hash so that the
store can index it without holding the key; it lets someone who already has an address
confirm it against a Return-Path, nothing more (it is only seen by the mail systems on
the path and by the recipient, who knows their address).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .addresses import address_key
from .errors import ConfigError

__all__ = [
    "MIN_SECRET_LENGTH",
    "VERP_TOKEN_LENGTH",
    "TokenClaims",
    "TokenKind",
    "TokenSigner",
    "WebSecretError",
    "parse_verp_token",
    "recipient_tag",
]

MIN_SECRET_LENGTH = 32
VERP_TOKEN_LENGTH = 32
# A click token carries its target URL; no sane link is longer (browsers cap near 2 MB,
# but a longer path segment than this is refused by proxies anyway).
_MAX_TOKEN_CHARS = 8192
_VERSION = b"\x01"
_URL_AD = b"mailer/url/1"
_VERP_PREFIX = b"mailer/verp/1\x00"
_TAG_BYTES = 8
_MAC_BYTES = 12
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_BASE32_LOWER = re.compile(r"[a-z2-7]+")


class WebSecretError(ConfigError):
    """The signing key is missing or too weak (exit 2, naming the variable, never the key)."""


class TokenKind(StrEnum):
    """What a URL token may be used for (its path letter)."""

    UNSUBSCRIBE = "u"
    OPEN = "o"
    CLICK = "c"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified URL token says: the campaign, the address as it was minted, and
    for a click token the target URL (None otherwise)."""

    kind: TokenKind
    campaign: str
    address: str
    url: str | None = None


def recipient_tag(address: str) -> int:
    """The 64-bit reference of an address in a VERP token, as a signed integer (the send
    log indexes it in an INTEGER column). Same for every spelling of one address key."""
    digest = hashlib.blake2b(address_key(address).encode("utf-8"), digest_size=_TAG_BYTES).digest()
    return int.from_bytes(digest, "big", signed=True)


def parse_verp_token(token: str) -> tuple[int, bytes] | None:
    """Split a VERP token into ``(recipient_tag, mac)``, or None when it is not one.

    Accepts either case (relays may fold it). The tag says which send-log rows to look
    at; :meth:`TokenSigner.resolve_verp` checks the MAC against them."""
    token = token.lower()
    if len(token) != VERP_TOKEN_LENGTH or not _BASE32_LOWER.fullmatch(token):
        return None
    try:
        raw = base64.b32decode(token.upper())  # 32 characters are 20 bytes: no padding needed
    except binascii.Error:
        return None
    return int.from_bytes(raw[:_TAG_BYTES], "big", signed=True), raw[_TAG_BYTES:]


def _derive(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class _Key:
    __slots__ = ("siv", "verp")

    def __init__(self, secret: str) -> None:
        raw = secret.encode("utf-8")
        self.siv = AESSIV(_derive(raw, b"mailer url token key", 64))
        self.verp = _derive(raw, b"mailer verp token key", 32)


class TokenSigner:
    """Mints and verifies tokens with the current key; verifies with the previous ones too.

    Build it once per process (:meth:`from_environment`); every method is thread-safe
    and cheap. Minting never fails for valid input; verifying returns None for anything
    that is not a token this signer (or a previous key) made — it never raises on
    hostile input.
    """

    __slots__ = ("_keys",)

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        self._keys = [_Key(secret)] + [_Key(old) for old in previous]

    @classmethod
    def from_environment(
        cls,
        secret_env: str = "MAILER_WEB_SECRET",
        previous_envs: Sequence[str] = (),
        *,
        environ: Mapping[str, str] | None = None,
    ) -> TokenSigner:
        """The signer of ``[web]``: the key in ``$secret_env``, old keys in ``previous_envs``.

        Raises :class:`WebSecretError` (exit 2) naming the variable when the current one
        is unset, empty or shorter than :data:`MIN_SECRET_LENGTH` characters, or when a
        previous one is set but too short; an unset previous variable is skipped (the
        rotation is over)."""
        env = os.environ if environ is None else environ
        secret = env.get(secret_env, "")
        _check_secret(secret_env, secret, required=True)
        previous = []
        for name in previous_envs:
            old = env.get(name, "")
            if old:
                _check_secret(name, old, required=False)
                previous.append(old)
        return cls(secret, previous)

    # --- URL tokens ---

    def unsubscribe_token(self, campaign: str, address: str) -> str:
        """The token of ``/u/<token>`` for ``address`` in ``campaign``."""
        return self._mint(TokenKind.UNSUBSCRIBE, _join(campaign, address))

    def open_token(self, campaign: str, address: str) -> str:
        """The token of the open pixel ``/o/<token>``."""
        return self._mint(TokenKind.OPEN, _join(campaign, address))

    def click_token(self, campaign: str, address: str, url: str) -> str:
        """The token of ``/c/<token>``, which redirects to ``url`` and nowhere else."""
        if "\x00" in url:
            raise ValueError("a URL cannot contain NUL")
        return self._mint(TokenKind.CLICK, _join(campaign, address) + b"\x00" + url.encode("utf-8"))

    def _mint(self, kind: TokenKind, plaintext: bytes) -> str:
        sealed = self._keys[0].siv.encrypt(plaintext, [_URL_AD, kind.value.encode()])
        return base64.urlsafe_b64encode(_VERSION + sealed).rstrip(b"=").decode("ascii")

    def verify(self, token: str, kind: TokenKind) -> TokenClaims | None:
        """The claims of a URL token of ``kind``, or None when it does not verify (forged,
        altered, truncated, of another kind, or signed by a key that is no longer listed)."""
        if not token or len(token) > _MAX_TOKEN_CHARS or not _BASE64URL.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        # One spelling per token: base64 leaves spare bits in the last character.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
            return None
        if len(raw) < 1 + 16 or raw[:1] != _VERSION:
            return None
        associated = [_URL_AD, kind.value.encode()]
        for key in self._keys:
            try:
                plaintext = key.siv.decrypt(raw[1:], associated)
            except InvalidTag:
                continue
            parts = plaintext.decode("utf-8").split("\x00")
            if kind is TokenKind.CLICK:
                if len(parts) != 3:
                    return None
                return TokenClaims(kind, parts[0], parts[1], parts[2])
            if len(parts) != 2:
                return None
            return TokenClaims(kind, parts[0], parts[1])
        return None

    # --- VERP tokens ---

    def verp_token(self, campaign: str, address: str) -> str:
        """The 32-character lower-case token of an envelope sender such as
        ``bounces+<token>@example.com`` for ``address`` in ``campaign``."""
        raw = recipient_tag(address).to_bytes(_TAG_BYTES, "big", signed=True) + self._verp_mac(
            self._keys[0], campaign, address
        )
        return base64.b32encode(raw).decode("ascii").lower()

    def resolve_verp(self, token: str, candidates: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
        """Which ``(campaign, address)`` of ``candidates`` the VERP ``token`` names, or None.

        ``candidates`` are the send-log rows whose recipient tag is the token's (see
        :func:`parse_verp_token`); the MAC decides between campaigns and rejects forgeries.
        """
        parsed = parse_verp_token(token)
        if parsed is None:
            return None
        tag, mac = parsed
        for campaign, address in candidates:
            if recipient_tag(address) != tag:
                continue
            for key in self._keys:
                if hmac.compare_digest(self._verp_mac(key, campaign, address), mac):
                    return campaign, address
        return None

    @staticmethod
    def _verp_mac(key: _Key, campaign: str, address: str) -> bytes:
        message = _VERP_PREFIX + _join(campaign, address_key(address))
        return hmac.new(key.verp, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _join(campaign: str, address: str) -> bytes:
    if "\x00" in campaign or "\x00" in address:
        raise ValueError("a campaign name or address cannot contain NUL")
    return campaign.encode("utf-8") + b"\x00" + address.strip().encode("utf-8")


def _check_secret(name: str, secret: str, *, required: bool) -> None:
    if not secret and required:
        raise WebSecretError(
            f"the web signing key variable {name} is not set.",
            key="web.secret_env",
            hint=f"Export {name} with a random key of at least {MIN_SECRET_LENGTH} characters, for example "
            "`export "
            f'{name}="$(python3 -c "import secrets; print(secrets.token_urlsafe(32))")"`'
            ", and keep it: links in mail already sent stop working without it.",
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise WebSecretError(
            f"the web signing key in {name} is too short ({len(secret)} characters; at least {MIN_SECRET_LENGTH}).",
            key="web.secret_env" if required else "web.previous_secret_envs",
            hint='Generate one with `python3 -c "import secrets; print(secrets.token_urlsafe(32))"`.',
        )
