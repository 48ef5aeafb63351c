"""DKIM signing (RFC 6376), RSA-SHA256 and Ed25519-SHA256 (RFC 8463), relaxed/relaxed.

:class:`DKIMSigner` reads and checks the private key once per run, then signs any
number of messages, from any number of threads. It also derives the DNS TXT record
to publish and compares a published record with the key (``mailer check``).

This module chooses what to sign and checks the key up front, so that a bad key is
one clear error before anything is sent, never a failure at message 1 of 100,000.
The signature itself is made by :mod:`mailer.dkim.relaxed` (canonicalization and
the header field, dkimpy's bytes exactly) with the key in OpenSSL: ~0.38 ms per
RSA-2048 signature on a 1.9 KB message, mostly the RSA operation with the GIL
released, and ~0.09 ms for Ed25519 (``bench.py dkim``, under load). dkimpy is the
reference: a test signature made when the key loads must verify with dkimpy, or
every message is signed by dkimpy instead (~0.6 ms with the RSA step in OpenSSL,
see :mod:`mailer.dkim.openssl`; ~12 ms in dkimpy's pure-Python RSA).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.crypto import (
    UnparsableKeyError,
    parse_private_key,
    parse_public_key,
)

from ..core.config import DKIMConfig
from ..core.errors import DKIMError
from .keys import (
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    decode_key,
    keygen_hint,
    rsa_self_test,
    rsa_subject_public_key_info,
)
from .openssl import LOGGER, UNUSED_RSA_PEM, OpenSSLRSADKIM, check_openssl_signing
from .record import check_dns_name, parse_tag_list
from .relaxed import sign_relaxed

__all__ = ["OVERSIGNED_HEADERS", "SIGNED_HEADERS", "DKIMSigner"]


#: Header fields signed when present, in this order. From is mandatory (RFC 6376
#: §5.4); the others are the ones a reader sees or acts on (RFC 6376 §5.4.1), plus
#: RFC 8058 §3.3, which requires the DKIM signature to cover both List-Unsubscribe
#: and List-Unsubscribe-Post for one-click unsubscribe to be honoured, and List-Id
#: (RFC 2919), which receivers group and filter by. dkimpy's
#: default list lacks List-Unsubscribe-Post and Feedback-ID, hence an explicit list.
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "feedback-id",
)

#: Present header fields that are listed one extra time in ``h=`` ("oversigned",
#: RFC 6376 §5.4.2 and §8.15): the extra entry signs "no further instance", so a
#: second From, Subject or List-Unsubscribe-Post added in transit breaks the
#: signature instead of being shown to the reader or followed by the receiver.
#: Only what a reader sees or a receiver acts on is oversigned: the address and
#: subject lines, the date, and the one-click unsubscribe pair (RFC 8058 §3.3).
#: Not the structural headers (Message-ID, MIME-Version, Content-Type: a second one
#: shows nothing to a reader, and receivers refuse such a message anyway), not
#: List-Id (list software that forwards the message adds its own, RFC 2919 §5) and
#: not Feedback-ID (Amazon SES adds its own next to the sender's). Only headers that
#: are present are oversigned: relays (SES, SendGrid, Mailgun) add their own
#: List-Unsubscribe to messages that lack one, and signing its absence would break
#: every such message.
OVERSIGNED_HEADERS: frozenset[str] = frozenset(
    {"from", "to", "cc", "reply-to", "subject", "date", "list-unsubscribe", "list-unsubscribe-post"}
)
_SIGNED = tuple((name.encode("ascii"), name in OVERSIGNED_HEADERS) for name in SIGNED_HEADERS)


def _included_fields(fields: list[tuple[bytes, bytes]] | list[list[bytes]]) -> list[bytes]:
    """The ``h=`` list for a message's fields: :data:`SIGNED_HEADERS` present, oversigned ones once more."""
    counts: dict[bytes, int] = {}
    for field in fields:
        lowered = field[0].lower()
        counts[lowered] = counts.get(lowered, 0) + 1
    if not counts.get(b"from"):
        raise DKIMError("cannot DKIM-sign a message without a From header field (RFC 6376 §5.4).")
    include: list[bytes] = []
    for key, oversigned in _SIGNED:
        present = counts.get(key, 0)
        # Every instance is signed (picked bottom-up, RFC 6376 §5.4.2); one more
        # entry signs the absence of a further instance.
        include.extend([key] * present)
        if present and oversigned:
            include.append(key)
    return include


def _rsa_digest_signer(key: rsa.RSAPrivateKey | None) -> Callable[[bytes], bytes]:
    """RSASSA-PKCS1-v1_5 over a SHA-256 digest (RFC 8017 §8.2), in OpenSSL."""
    assert key is not None
    pkcs1 = padding.PKCS1v15()
    prehashed = Prehashed(hashes.SHA256())

    def sign_digest(digest: bytes) -> bytes:
        return key.sign(digest, pkcs1, prehashed)

    return sign_digest


class DKIMSigner:
    """A DKIM private key, loaded and checked once, ready to sign messages.

    Build one with :meth:`load` (from ``[dkim]`` in the config) or
    :meth:`from_key_bytes`. ``warnings`` holds human-readable problems that do not
    stop a run (a key file others can read, a short RSA key); the CLI prints them.

    Instances are immutable after construction and :meth:`sign` keeps no state
    between calls (each call builds its own dkimpy object), so one signer can be
    shared by every sending thread. RSA signatures are computed by OpenSSL, which
    releases the GIL, so RSA signing scales with threads up to the number of cores.
    """

    def __init__(
        self,
        *,
        domain: str,
        selector: str,
        algorithm: str,
        key_bits: int,
        private_key: bytes,
        public_key: bytes,
        path: Path | None = None,
        warnings: list[str] | None = None,
        openssl_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        # Internal constructor: use load() or from_key_bytes(), which validate.
        self.domain = domain
        self.selector = selector
        self.algorithm = algorithm  # "rsa-sha256" | "ed25519-sha256"
        self.key_bits = key_bits
        self.path = path
        self.warnings: list[str] = list(warnings or [])
        self._private_key = private_key  # in the form dkimpy.sign() takes
        self._public_key = public_key  # SubjectPublicKeyInfo DER (RSA) or 32 raw bytes (Ed25519)
        # RSA only: the same key in OpenSSL; None signs through dkimpy's pure-Python RSA.
        self._openssl_key = openssl_key
        self._domain_bytes = domain.encode("ascii")
        self._selector_bytes = selector.encode("ascii")
        self._algorithm_bytes = algorithm.encode("ascii")
        # The private-key operation of the fast path (set by from_key_bytes once its
        # self-test passed); None signs through dkimpy.
        self._sign_digest: Callable[[bytes], bytes] | None = None

    def __repr__(self) -> str:
        # Never show key material, even in a debugger or a traceback with locals.
        return (
            f"DKIMSigner(domain={self.domain!r}, selector={self.selector!r}, "
            f"algorithm={self.algorithm!r}, key_bits={self.key_bits}, path={str(self.path)!r})"
        )

    @property
    def key_type(self) -> str:
        """The DNS ``k=`` value: ``"rsa"`` or ``"ed25519"``."""
        return "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, config: DKIMConfig) -> DKIMSigner:
        """Read, parse and check the private key named by ``[dkim] private_key``.

        Accepted forms: PEM RSA keys, PKCS#1 (``BEGIN RSA PRIVATE KEY``) or PKCS#8
        (``BEGIN PRIVATE KEY``, what OpenSSL 3 writes); PEM PKCS#8 Ed25519 keys
        (``openssl genpkey -algorithm ed25519``); and dkimpy's own Ed25519 form, the
        base64 of the 32-byte seed (``dknewkey --ktype ed25519``), or of libsodium's
        64-byte seed-and-public-key. DER files work too.

        Raises :class:`DKIMError` (exit 2) naming the file for a missing, unreadable,
        encrypted, malformed or too-short key.
        """
        path = Path(config.private_key)
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise DKIMError("DKIM private key file not found.", path=str(path), hint=keygen_hint(path)) from None
        except PermissionError:
            raise DKIMError(
                "cannot read the DKIM private key (permission denied).",
                path=str(path),
                hint="Run mailer as the key's owner, or `chown` the file to that user (keep it mode 600).",
            ) from None
        except IsADirectoryError:
            raise DKIMError(
                "the DKIM private key path is a directory, not a key file.",
                path=str(path),
                hint="Point [dkim] private_key at the PEM file.",
            ) from None
        except OSError as exc:
            raise DKIMError(f"cannot read the DKIM private key ({exc.strerror}).", path=str(path)) from None

        signer = cls.from_key_bytes(data, domain=config.domain, selector=config.selector, path=path)
        # The key lets anyone who reads it sign mail as the domain. Group/other
        # access is only meaningful on POSIX permission bits.
        if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
            who = " and ".join(
                name for bits, name in ((0o070, "its group"), (0o007, "every user")) if stat.S_IMODE(mode) & bits
            )
            signer.warnings.insert(
                0,
                f"{path}: the DKIM private key is readable by {who} (mode {stat.S_IMODE(mode):04o}); "
                f"anyone who can read it can sign mail as {config.domain}. Fix: chmod 600 {path}",
            )
        return signer

    @classmethod
    def from_key_bytes(cls, data: bytes, *, domain: str, selector: str, path: Path | str | None = None) -> DKIMSigner:
        """Build a signer from the bytes of a key file (see :meth:`load` for the forms).

        ``path`` only names the key in error messages.
        """
        where = str(path) if path is not None else "<DKIM key>"
        hint_path = Path(path) if path is not None else Path("dkim-private.pem")
        domain = check_dns_name(domain, what="[dkim] domain", where=where)
        selector = check_dns_name(selector, what="[dkim] selector", where=where)

        kind, material = decode_key(data, where=where, hint_path=hint_path)
        warnings: list[str] = []
        if kind == "ed25519":
            signing_key = nacl.signing.SigningKey(material)
            public = signing_key.verify_key.encode()
            # A receiver that does not implement RFC 8463 cannot verify an Ed25519
            # signature and judges the message as unsigned; not every large one
            # implements it, while RSA is verified everywhere.
            warnings.append(
                f"{where}: an Ed25519 DKIM key alone is not verified by several large mailbox "
                "providers; mail signed only with it counts as unsigned there. Prefer an RSA-2048 key "
                f"(`openssl genrsa -out dkim-rsa.pem 2048`)."
            )
            signer = cls(
                domain=domain,
                selector=selector,
                algorithm="ed25519-sha256",
                key_bits=256,
                private_key=base64.b64encode(material),
                public_key=public,
                path=Path(path) if path is not None else None,
                warnings=warnings,
            )
            signer._use_fast_signing(Ed25519PrivateKey.from_private_bytes(material).sign, where)
            return signer

        try:
            fields: dict[str, int] = parse_private_key(material)
        except (UnparsableKeyError, IndexError, ValueError, TypeError) as exc:
            raise DKIMError(
                f"the DKIM private key is not a valid RSA key ({str(exc).splitlines()[0]}).",
                path=where,
                hint=keygen_hint(hint_path),
            ) from None
        modulus, exponent = fields["modulus"], fields["publicExponent"]
        bits = modulus.bit_length()
        if bits < MIN_RSA_BITS:
            raise DKIMError(
                f"the DKIM key is RSA-{bits}; receivers reject keys shorter than {MIN_RSA_BITS} bits (RFC 8301 §3.2).",
                path=where,
                hint=keygen_hint(hint_path),
            )
        # A damaged file can still parse. Sign once and verify with the public half
        # (~10 ms, once per run): a bad key would otherwise make every signature of
        # the run fail at every receiver, silently.
        if fields["prime1"] * fields["prime2"] != modulus or not rsa_self_test(fields):
            raise DKIMError(
                "the DKIM private key is damaged (a test signature does not verify with its public key).",
                path=where,
                hint=keygen_hint(hint_path),
            )
        if bits < RECOMMENDED_RSA_BITS:
            warnings.append(
                f"{where}: the DKIM key is RSA-{bits}; RFC 8301 §3.2 says signers SHOULD use 2048 bits. "
                f"Make a new key with `openssl genrsa -out {hint_path} 2048` and publish its record."
            )
        # dkimpy takes PEM text and finds the base64 between "--\n" and "\n--", which
        # fails on CRLF files and extra PEM headers; hand it a normalized PEM of the
        # DER we already decoded (its parser accepts PKCS#1 and PKCS#8 DER alike).
        pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(material) + b"\n-----END PRIVATE KEY-----\n"
        signer = cls(
            domain=domain,
            selector=selector,
            algorithm="rsa-sha256",
            key_bits=bits,
            private_key=pem,
            public_key=rsa_subject_public_key_info(modulus, exponent),
            path=Path(path) if path is not None else None,
            warnings=warnings,
        )
        signer._openssl_key, problem = check_openssl_signing(signer, material)
        if problem:
            # Still correct, only slow: mail goes out signed, at dkimpy's speed.
            signer.warnings.append(
                f"{where}: RSA signing falls back to dkimpy's pure-Python RSA ({problem}), "
                "at most ~85 signatures/s per process instead of several hundred."
            )
        else:
            signer._use_fast_signing(_rsa_digest_signer(signer._openssl_key), where)
        return signer

    def _use_fast_signing(self, sign_digest: Callable[[bytes], bytes], where: str) -> None:
        problem = self._check_fast_signing(sign_digest)
        if problem:
            # Still correct, only slower: every message is signed by dkimpy.
            self.warnings.append(f"{where}: DKIM signing falls back to dkimpy ({problem}), about five times slower.")
        else:
            self._sign_digest = sign_digest

    # ------------------------------------------------------------------ signing

    def sign(self, message: bytes) -> bytes:
        """Return ``message`` with a DKIM-Signature header field prepended.

        ``message`` is the complete RFC 5322 message as bytes, with CRLF or LF line
        endings; the signature header uses the same ending. Canonicalization is
        relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4), which survives the header
        refolding and trailing-whitespace changes relays commonly make. Signed
        fields: :data:`SIGNED_HEADERS` that are present, with
        :data:`OVERSIGNED_HEADERS` listed once more.

        Thread-safe. Signed by :func:`mailer.dkim.relaxed.sign_relaxed` (the same
        bytes as dkimpy, see the module): on a 1.9 KB message about 0.3 ms for
        RSA-2048, nearly all of it in OpenSSL with the GIL released, and 0.07 ms
        for Ed25519. When that path is unavailable (a warning says so), dkimpy
        signs: ~1.4 ms, or ~12 ms under the GIL without OpenSSL.

        Raises :class:`DKIMError` when the message has no From field (RFC 6376
        §5.4 requires it to be signed) or its header block does not parse.
        """
        if self._sign_digest is not None:
            return (
                sign_relaxed(
                    message,
                    domain=self._domain_bytes,
                    selector=self._selector_bytes,
                    algorithm=self._algorithm_bytes,
                    include=_included_fields,
                    sign_digest=self._sign_digest,
                    timestamp=int(time.time()),
                )
                + message
            )
        return self._sign_with_dkimpy(message)

    def _sign_with_dkimpy(self, message: bytes) -> bytes:
        """dkimpy's signature of ``message`` (the fallback, and the reference)."""
        newline = message.find(b"\n")
        linesep = b"\r\n" if newline > 0 and message[newline - 1 : newline] == b"\r" else b"\n"
        try:
            if self._openssl_key is not None:
                signer = OpenSSLRSADKIM(message, openssl_key=self._openssl_key, logger=LOGGER, linesep=linesep)
            else:
                signer = dkimpy.DKIM(message, logger=LOGGER, signature_algorithm=self._algorithm_bytes, linesep=linesep)
        except dkimpy.DKIMException as exc:
            raise DKIMError(f"cannot DKIM-sign this message: {exc}.") from None
        include = _included_fields(signer.headers)
        try:
            header: bytes = signer.sign(
                self._selector_bytes,
                self._domain_bytes,
                UNUSED_RSA_PEM if self._openssl_key is not None else self._private_key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        except dkimpy.DKIMException as exc:
            raise DKIMError(f"cannot DKIM-sign this message: {exc}.") from None
        return header + message

    def _check_fast_signing(self, sign_digest: Callable[[bytes], bytes]) -> str:
        """Sign a test message through :func:`sign_relaxed`; dkimpy must verify it.

        Returns "" when it does, else the problem (the signer then stays on dkimpy).
        """
        message = (
            b"From: mailer <dkim-self-test@" + self._domain_bytes + b">\r\n"
            b"Subject: DKIM  self-test \r\n\tfolded\r\n"
            b"\r\nmailer DKIM self-test \r\n\r\n"
        )
        name, record = self.dns_record()
        try:
            header = sign_relaxed(
                message,
                domain=self._domain_bytes,
                selector=self._selector_bytes,
                algorithm=self._algorithm_bytes,
                include=_included_fields,
                sign_digest=sign_digest,
                timestamp=int(time.time()),
            )
            verified = dkimpy.verify(
                header + message,
                logger=LOGGER,
                dnsfunc=lambda qname, timeout=5: (
                    record.encode("ascii") if qname.rstrip(b".") == name.encode() else None
                ),
            )
        except Exception as exc:  # any failure here only means "sign through dkimpy"
            return f"{type(exc).__name__}: {exc}"
        return "" if verified else "its test signature does not verify with dkimpy"

    # ------------------------------------------------------------------ DNS

    def dns_record(self) -> tuple[str, str]:
        """The TXT record to publish: ``(name, value)``.

        ``name`` is ``<selector>._domainkey.<domain>`` (RFC 6376 §3.6.2.1); ``value``
        is ``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`` (RFC 6376 §3.6.1) or
        ``v=DKIM1; k=ed25519; p=<base64 of the 32-byte public key>`` (RFC 8463 §4).
        An RSA-2048 value is longer than one 255-byte TXT string; DNS hosts split it
        into several strings, which verifiers join (RFC 6376 §3.6.2.2).
        """
        name = f"{self.selector}._domainkey.{self.domain}"
        value = f"v=DKIM1; k={self.key_type}; p={base64.b64encode(self._public_key).decode('ascii')}"
        return name, value

    def public_key_matches(self, txt_value: str | bytes) -> bool:
        """Whether a published DKIM TXT record holds this signer's public key.

        ``txt_value`` is the record text with its strings already concatenated.
        False for another key, another key type, a revoked key (empty ``p=``), or a
        record that does not parse.
        """
        if isinstance(txt_value, bytes):
            txt_value = txt_value.decode("ascii", errors="replace")
        tags = parse_tag_list(txt_value)
        if tags is None:
            return False
        if tags.get("v", "DKIM1") != "DKIM1":
            return False
        if tags.get("k", "rsa").lower() != self.key_type:
            return False
        # p= may be folded with whitespace (RFC 6376 §3.6.1, base64string allows FWS).
        published = re.sub(r"\s+", "", tags.get("p", ""))
        if not published:
            return False  # an empty p= means the key was revoked (RFC 6376 §3.6.1)
        try:
            raw = base64.b64decode(published, validate=True)
        except (binascii.Error, ValueError):
            return False
        if self.key_type == "ed25519":
            return raw == self._public_key
        try:
            theirs: dict[str, int] = parse_public_key(raw)
            ours: dict[str, int] = parse_public_key(self._public_key)
        except (UnparsableKeyError, IndexError, ValueError, TypeError):
            return False
        return theirs["modulus"] == ours["modulus"] and theirs["publicExponent"] == ours["publicExponent"]
