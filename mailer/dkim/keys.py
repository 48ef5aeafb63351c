"""DKIM private keys: read a PEM file (PKCS#1, PKCS#8, RSA or Ed25519) and check it before any send.

Hand-written DER reading, because a key that cannot sign must be one clear error
naming the file and how to make a good key, not a library traceback at message 1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from pathlib import Path

import nacl.signing
from dkim.crypto import (
    RSASSA_PKCS1_v1_5_sign,
    RSASSA_PKCS1_v1_5_verify,
)

from ..core.errors import DKIMError

__all__ = [
    "ED25519_ALGORITHM",
    "MIN_RSA_BITS",
    "RECOMMENDED_RSA_BITS",
    "decode_key",
    "keygen_hint",
    "rsa_self_test",
    "rsa_subject_public_key_info",
]


#: RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (verifiers reject
#: shorter ones) and SHOULD use at least 2048.
MIN_RSA_BITS = 1024
RECOMMENDED_RSA_BITS = 2048
ED25519_ALGORITHM = b"ed25519-sha256"

# DER object identifiers (tag 0x06 contents).
_OID_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_OID_ED25519 = bytes.fromhex("2b6570")  # 1.3.101.112, RFC 8410

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def keygen_hint(path: Path) -> str:
    return (
        f"Make a new key with `openssl genrsa -out {path} 2048 && chmod 600 {path}`, "
        "then run `mailer check` to see the DNS record to publish."
    )


def decode_key(data: bytes, *, where: str, hint_path: Path) -> tuple[str, bytes]:
    """Identify a key file's content: ``("rsa", DER)`` or ``("ed25519", 32-byte seed)``."""
    if b"-----BEGIN" in data:
        blocks = _PEM_BLOCK.findall(data)
        labels = [label.decode("ascii") for label, _ in blocks]
        private = [(label, body) for label, body in blocks if label.endswith(b"PRIVATE KEY")]
        if not private:
            found = ", ".join(labels) or "an incomplete PEM block"
            raise DKIMError(
                f"no private key in this PEM file (found: {found}).",
                path=where,
                hint="[dkim] private_key must be the private key, not the public key or a certificate. "
                + keygen_hint(hint_path),
            )
        label, body = private[0]
        if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type:" in body:
            raise DKIMError(
                "the DKIM private key is encrypted with a passphrase; mailer cannot prompt for it.",
                path=where,
                hint=f"Write a decrypted copy with `openssl pkey -in {hint_path} -out dkim-plain.pem` and chmod 600 it.",
            )
        if label not in (b"RSA PRIVATE KEY", b"PRIVATE KEY"):
            raise DKIMError(
                f"unsupported key type ({label.decode('ascii')}); DKIM signs with RSA or Ed25519 only "
                "(RFC 6376, RFC 8463).",
                path=where,
                hint=keygen_hint(hint_path),
            )
        try:
            der = base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except (binascii.Error, ValueError):
            raise DKIMError(
                "the PEM block of the DKIM private key is not valid base64 (damaged file?).",
                path=where,
                hint=keygen_hint(hint_path),
            ) from None
        return _classify_der(der, pkcs1=(label == b"RSA PRIVATE KEY"), where=where, hint_path=hint_path)

    # dkimpy's Ed25519 form: base64 of the 32-byte seed (dknewkey writes this), or
    # libsodium's 64-byte secret key (seed followed by the public key).
    text = re.sub(rb"\s+", b"", data)
    try:
        raw = base64.b64decode(text, validate=True) if text else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not raw and data[:1] == b"\x30":
        # Binary DER (openssl ... -outform DER). Checked after base64, because a
        # base64 text may itself start with "0" (0x30).
        return _classify_der(data, pkcs1=False, where=where, hint_path=hint_path)
    if len(raw) == 32:
        return "ed25519", raw
    if len(raw) == 64:
        seed, public = raw[:32], raw[32:]
        if nacl.signing.SigningKey(seed).verify_key.encode() != public:
            raise DKIMError(
                "the Ed25519 key's public half does not match its seed (damaged file?).",
                path=where,
                hint="Regenerate it with `dknewkey --ktype ed25519` or `openssl genpkey -algorithm ed25519`.",
            )
        return "ed25519", seed
    if not data.strip():
        problem = "the DKIM private key file is empty."
    else:
        problem = "the DKIM private key is neither a PEM key nor an Ed25519 key in base64."
    raise DKIMError(problem, path=where, hint=keygen_hint(hint_path))


def _classify_der(der: bytes, *, pkcs1: bool, where: str, hint_path: Path) -> tuple[str, bytes]:
    """Tell an RSA key (PKCS#1 or PKCS#8) from an Ed25519 PKCS#8 key (RFC 8410 §7)."""
    if pkcs1:
        return "rsa", der
    try:
        tag, outer, _ = _der_read(der, 0)
        if tag != 0x30:
            raise ValueError("not a SEQUENCE")
        tag, _version, offset = _der_read(outer, 0)
        if tag != 0x02:
            raise ValueError("no version")
        tag, algorithm, offset_after_algorithm = _der_read(outer, offset)
        if tag != 0x30:
            # A bare PKCS#1 RSAPrivateKey: SEQUENCE { INTEGER version, INTEGER n, ... }.
            return "rsa", der
        tag, oid, _ = _der_read(algorithm, 0)
        if tag != 0x06:
            raise ValueError("no algorithm identifier")
        if oid == _OID_RSA_ENCRYPTION:
            return "rsa", der
        if oid == _OID_ED25519:
            tag, private_octets, _ = _der_read(outer, offset_after_algorithm)
            if tag != 0x04:
                raise ValueError("no private key")
            # RFC 8410 §7: privateKey is an OCTET STRING wrapping the 32-byte seed.
            tag, seed, _ = _der_read(private_octets, 0)
            if tag != 0x04 or len(seed) != 32:
                raise ValueError("Ed25519 seed is not 32 bytes")
            return "ed25519", seed
    except (ValueError, IndexError) as exc:
        raise DKIMError(
            f"the DKIM private key does not parse ({exc}).",
            path=where,
            hint=keygen_hint(hint_path),
        ) from None
    raise DKIMError(
        f"unsupported key algorithm (OID {oid.hex()}); DKIM signs with RSA or Ed25519 only (RFC 6376, RFC 8463).",
        path=where,
        hint=keygen_hint(hint_path),
    )


def rsa_self_test(fields: dict[str, int]) -> bool:
    """Sign a fixed digest with dkimpy's RSA key ``fields`` and verify it with the public half."""
    digest = hashlib.sha256(b"mailer DKIM key self-test")
    try:
        signature = RSASSA_PKCS1_v1_5_sign(digest, fields)
    except Exception:  # dkimpy raises assorted errors on inconsistent numbers
        return False
    public = {"modulus": fields["modulus"], "publicExponent": fields["publicExponent"]}
    verified: bool = RSASSA_PKCS1_v1_5_verify(digest, bytes(signature), public)
    return verified


def _der_read(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at ``offset``: (tag, contents, offset after it)."""
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    end = offset + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[offset:end], end


def _der(tag: int, contents: bytes) -> bytes:
    length = len(contents)
    if length < 0x80:
        encoded = bytes([length])
    else:
        size = (length.bit_length() + 7) // 8
        encoded = bytes([0x80 | size]) + length.to_bytes(size, "big")
    return bytes([tag]) + encoded + contents


def _der_integer(value: int) -> bytes:
    # One extra bit so that a set top bit is not read as a negative number.
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_subject_public_key_info(modulus: int, exponent: int) -> bytes:
    """DER SubjectPublicKeyInfo for an RSA key: what RFC 6376 §3.6.1 puts in ``p=``."""
    rsa_public_key = _der(0x30, _der_integer(modulus) + _der_integer(exponent))
    algorithm = _der(0x30, _der(0x06, _OID_RSA_ENCRYPTION) + _der(0x05, b""))
    return _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_public_key))
