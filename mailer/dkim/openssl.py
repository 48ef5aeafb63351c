"""RSA-SHA256 DKIM signatures through OpenSSL, with dkimpy's canonicalization.

dkimpy computes RSA in Python integers; this subclass hands it a prehashed OpenSSL
key instead, so the signature (deterministic RSASSA-PKCS1-v1_5, the same bytes)
costs a fraction and releases the GIL. :func:`check_openssl_signing` proves the
path once per key against dkimpy itself and falls back when it does not hold.
"""

from __future__ import annotations

import base64
import importlib.metadata
import logging
from typing import TYPE_CHECKING, NamedTuple

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_private_key

from .keys import ED25519_ALGORITHM

__all__ = ["LOGGER", "UNUSED_RSA_PEM", "OpenSSLRSADKIM", "check_openssl_signing", "dkimpy_version"]


_RSA_ALGORITHM = b"rsa-sha256"

if TYPE_CHECKING:
    from .signer import DKIMSigner

# dkimpy logs through "dkimpy"; keep it quiet unless the application configures it.
LOGGER = logging.getLogger("mailer.dkim")


class _Signature(NamedTuple):
    signature: bytes


class _PrehashedRSAKey:
    """An OpenSSL RSA key shaped like the PyNaCl key dkimpy's Ed25519 branch calls.

    ``sign(digest)`` returns the RSASSA-PKCS1-v1_5 signature (RFC 8017 §8.2) of a
    SHA-256 digest, as ``.signature``. OpenSSL builds the same DigestInfo encoding
    as dkimpy's ``EMSA_PKCS1_v1_5_encode``, so the bytes are identical.
    """

    __slots__ = ("_key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _Signature:
        return _Signature(self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))


# dkimpy's sign() parses the PEM key it is given, in Python, on every call (a PKCS#8
# RSA-2048 key three times over: about a quarter of the signing time), although the
# OpenSSL path below never uses what it parsed. It is handed this instead: a
# well-formed PKCS#1 RSAPrivateKey whose nine integers are 0 and 1, cheap to parse
# and useless for signing. If dkimpy ever signed with it, the self-test's signature
# would not verify and signing would fall back to plain dkimpy with the real key.
UNUSED_RSA_PEM = (
    b"-----BEGIN RSA PRIVATE KEY-----\n"
    + base64.b64encode(b"\x30\x1b\x02\x01\x00" + b"\x02\x01\x01" * 8)
    + b"\n-----END RSA PRIVATE KEY-----\n"
)


class OpenSSLRSADKIM(dkimpy.DKIM):  # type: ignore[misc]  # dkimpy has no type information (no py.typed, no stubs)
    """dkimpy's rsa-sha256 signer with the RSA operation done by OpenSSL.

    dkimpy has no hook for the private-key operation. Its ``sign`` builds the tags
    (``a=rsa-sha256`` included) and hands them to ``gen_header``, which hashes the
    canonicalized header fields and then branches on ``signature_algorithm``: for
    RSA it calls the module-level ``RSASSA_PKCS1_v1_5_sign`` (pure Python); for
    Ed25519 it calls ``pk.sign(digest).signature`` on the key object it is given.
    That call is the only seam local to one signing object, so this subclass routes
    ``gen_header`` through the Ed25519 branch with a key that RSA-signs the same
    SHA-256 digest. The alternative, replacing ``dkim.RSASSA_PKCS1_v1_5_sign``,
    would change a global that every thread and every other dkimpy user shares.

    Everything else (tags, ``h=``, canonicalization, body hash, folding) is still
    dkimpy's. This leans on dkimpy internals (checked with 1.1.8), so
    :func:`_check_openssl_signing` signs and verifies a message through it when a
    key is loaded, and a mismatch falls back to plain dkimpy instead of sending
    signatures that do not verify. One instance signs one message in one thread.
    """

    # Set by dkimpy's DKIM (untyped); declared here so that the override is checked.
    signature_algorithm: bytes

    def __init__(self, message: bytes, *, openssl_key: rsa.RSAPrivateKey, **kwargs: object) -> None:
        super().__init__(message, signature_algorithm=_RSA_ALGORITHM, **kwargs)
        self._prehashed_key = _PrehashedRSAKey(openssl_key)
        self.signed_by_openssl = False  # lets the self-test see that the override ran

    # The parameters are dkimpy's; canon_policy (its CanonicalizationPolicy) and pk
    # (its parsed key) are only passed through. The result is the header field's value.
    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: list[bytes],
        canon_policy: object,
        header_name: bytes,
        pk: object,
        standardize: bool = False,
    ) -> bytes:
        if self.signature_algorithm != _RSA_ALGORITHM:
            plain: bytes = super().gen_header(fields, include_headers, canon_policy, header_name, pk, standardize)
            return plain
        # The tags, a= included, are already in ``fields``; the hash (self.hasher,
        # set by sign()) is SHA-256 for both algorithms. Only the call that makes
        # the signature changes; dkimpy's parsed ``pk`` is left unused.
        self.signature_algorithm = ED25519_ALGORITHM
        try:
            header: bytes = super().gen_header(
                fields, include_headers, canon_policy, header_name, self._prehashed_key, standardize
            )
        finally:
            self.signature_algorithm = _RSA_ALGORITHM
        self.signed_by_openssl = True
        return header


def check_openssl_signing(signer: DKIMSigner, der: bytes) -> tuple[rsa.RSAPrivateKey | None, str]:
    """Load an RSA key (PKCS#1 or PKCS#8 DER) into OpenSSL and prove it signs through dkimpy.

    Returns ``(key, "")``, or ``(None, reason)`` when OpenSSL refuses the key, or a
    test message signed through :class:`_OpenSSLRSADKIM` does not verify with the
    signer's own DNS record or was not signed by OpenSSL after all (a dkimpy
    version whose internals differ).
    """
    try:
        key = load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        return None, f"OpenSSL refuses the key: {exc}"
    if not isinstance(key, rsa.RSAPrivateKey):
        return None, "OpenSSL does not read it as an RSA key"
    linesep = b"\r\n"
    message = (
        b"From: mailer <dkim-self-test@"
        + signer._domain_bytes
        + b">"
        + linesep
        + b"Subject: DKIM self-test"
        + linesep
        + linesep
        + b"mailer DKIM self-test"
        + linesep
    )
    name, record = signer.dns_record()
    try:
        test_signer = OpenSSLRSADKIM(message, openssl_key=key, logger=LOGGER, linesep=linesep)
        header = test_signer.sign(
            signer._selector_bytes,
            signer._domain_bytes,
            UNUSED_RSA_PEM,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"subject"],
        )
        verified = dkimpy.verify(
            header + message,
            logger=LOGGER,
            dnsfunc=lambda qname, timeout=5: record.encode("ascii") if qname.rstrip(b".") == name.encode() else None,
        )
    except Exception as exc:  # any failure here only means "use plain dkimpy"
        return None, f"the OpenSSL path fails with dkimpy {dkimpy_version()}: {type(exc).__name__}: {exc}"
    if not verified:
        return None, f"the OpenSSL path makes signatures that do not verify with dkimpy {dkimpy_version()}"
    if not test_signer.signed_by_openssl:
        return None, f"dkimpy {dkimpy_version()} no longer signs through the OpenSSL path"
    return key, ""


def dkimpy_version() -> str:
    try:
        return importlib.metadata.version("dkimpy")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
