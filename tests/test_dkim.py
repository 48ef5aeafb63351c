"""Tests for mailer.dkim: keys, signing, the DNS record, and independent verification.

Signatures are verified with dkimpy's verifier, fed the TXT record our own code
produced (no real DNS). RSA keys come from the openssl command (skipped without it);
Ed25519 keys from PyNaCl. RSA signatures made through OpenSSL are also compared byte
for byte with dkimpy's own pure-Python ones, with the clock pinned.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import shutil
import stat
import subprocess
import threading
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from types import SimpleNamespace

import dkim
import nacl.encoding
import nacl.signing
import pytest
from dkim.crypto import parse_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailer.dkim.openssl
import mailer.dkim.signer
from mailer.core.config import DKIMConfig
from mailer.core.errors import DKIMError, ExitCode
from mailer.dkim.record import parse_tag_list
from mailer.dkim.signer import OVERSIGNED_HEADERS, SIGNED_HEADERS, DKIMSigner

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is needed to make RSA keys")

DOMAIN = "acme.example"
SELECTOR = "mail2026"


# ---------------------------------------------------------------- helpers


def openssl(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run([OPENSSL, *args], input=stdin, check=True, capture_output=True).stdout


# The fields of an RSAPrivateKey (RFC 8017 A.1.2), in their DER order.
PKCS1_FIELDS = (
    "version",
    "modulus",
    "publicExponent",
    "privateExponent",
    "prime1",
    "prime2",
    "exponent1",
    "exponent2",
    "coefficient",
)


def write_key(directory: Path, data: bytes, *, name: str = "dkim.pem", mode: int = 0o600) -> Path:
    path = directory / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def load(path: Path, *, domain: str = DOMAIN, selector: str = SELECTOR) -> DKIMSigner:
    return DKIMSigner.load(DKIMConfig(domain=domain, selector=selector, private_key=path))


def build_message(
    *,
    subject: str = "Your Pro plan renews on 1 March",
    body_text: str | None = None,
    cc: bool = False,
    linesep: str = "\r\n",
) -> bytes:
    """A realistic ~4 KB multipart/alternative message with the bulk-mail headers."""
    msg = EmailMessage()
    msg["From"] = "Acme News <news@acme.example>"
    msg["To"] = "Jane Doe <jane@example.org>"
    if cc:
        msg["Cc"] = "billing@acme.example"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(1767225600, localtime=False)
    msg["Message-ID"] = "<20260101.1234.jane@acme.example>"
    msg["Reply-To"] = "support@acme.example"
    msg["List-Unsubscribe"] = (
        "<https://acme.example/unsubscribe?u=jane%40example.org>, <mailto:unsubscribe@acme.example>"
    )
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Feedback-ID"] = "renewal:newsletter:acme"
    text = body_text if body_text is not None else "Hi Jane,\n\n" + "Your plan renews soon. " * 80 + "\n"
    msg.set_content(text)
    msg.add_alternative(f"<html><body><p>{'Your plan renews soon. ' * 80}</p></body></html>", subtype="html")
    data = msg.as_bytes(policy=SMTP)
    return data if linesep == "\r\n" else data.replace(b"\r\n", b"\n")


def verify(signed: bytes, signer: DKIMSigner, record: str | None = None) -> bool:
    """dkimpy's verifier, with DNS answered from ``signer.dns_record()`` (or ``record``)."""
    name, value = signer.dns_record()
    if record is not None:
        value = record
    asked: list[bytes] = []

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        asked.append(qname)
        return value.encode() if qname.rstrip(b".").decode() == name else None

    result = dkim.verify(signed, dnsfunc=dnsfunc)
    assert asked, "the verifier never looked up the key"
    return result


def signature_tags(signed: bytes) -> dict[str, str]:
    header_block = signed.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header_block).decode()
    line = next(line for line in unfolded.splitlines() if line.lower().startswith("dkim-signature:"))
    tags = {}
    for part in line.split(":", 1)[1].split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            tags[key.strip()] = re.sub(r"\s+", "", value)
    return tags


def replace_header(message: bytes, name: str, new_value: str) -> bytes:
    pattern = re.compile(rb"^(" + name.encode() + rb":)[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.IGNORECASE | re.MULTILINE)
    result, count = pattern.subn(lambda m: m.group(1) + b" " + new_value.encode(), message, count=1)
    assert count == 1, f"no {name} header to replace"
    return result


def sign_with_dkimpy_alone(message: bytes, pem_key: bytes, include_headers: list[str]) -> bytes:
    """What dkimpy produces by itself (pure-Python RSA) for the settings DKIMSigner uses."""
    linesep = b"\n" if b"\r\n" not in message else b"\r\n"
    header = dkim.DKIM(message, signature_algorithm=b"rsa-sha256", linesep=linesep).sign(
        SELECTOR.encode(),
        DOMAIN.encode(),
        pem_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[name.encode() for name in include_headers],
    )
    return header + message


def refuse_pure_python_rsa(digest, private_key):  # pragma: no cover - must not be called
    raise AssertionError("the OpenSSL path called dkimpy's pure-Python RSA")


PINNED_TIME = 1767225600  # t= is signed, so byte-for-byte comparisons need one clock


@pytest.fixture
def pinned_clock(monkeypatch):
    # dkimpy reads time.time() through its module's "time" name; swap that name
    # only, so t= is fixed without touching the time module everyone else uses.
    monkeypatch.setattr(dkim, "time", SimpleNamespace(time=lambda: float(PINNED_TIME)))
    monkeypatch.setattr(mailer.dkim.signer, "time", SimpleNamespace(time=lambda: float(PINNED_TIME)))


def der(tag: int, contents: bytes) -> bytes:
    length = len(contents)
    if length < 0x80:
        return bytes([tag, length]) + contents
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + contents


def der_int(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def pem(label: str, data: bytes) -> bytes:
    body = base64.encodebytes(data).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n".encode() + lines + f"\n-----END {label}-----\n".encode()


def ed25519_pkcs8(seed: bytes) -> bytes:
    # RFC 8410 §7: OneAsymmetricKey with the Ed25519 OID and the seed in an OCTET STRING.
    return der(0x30, der_int(0) + der(0x30, der(0x06, bytes.fromhex("2b6570"))) + der(0x04, der(0x04, seed)))


# ---------------------------------------------------------------- keys (made once per module)


@pytest.fixture(scope="module")
def rsa_2048_pkcs8() -> bytes:
    if OPENSSL is None:
        pytest.skip("openssl is needed to make RSA keys")
    # OpenSSL 3 writes PKCS#8 ("BEGIN PRIVATE KEY"); 1.1 writes PKCS#1. Force PKCS#8.
    return openssl("pkey", stdin=openssl("genrsa", "2048"))


@pytest.fixture(scope="module")
def rsa_2048_pkcs1(rsa_2048_pkcs8: bytes) -> bytes:
    try:
        return openssl("rsa", "-traditional", stdin=rsa_2048_pkcs8)
    except subprocess.CalledProcessError:  # OpenSSL 1.1 has no -traditional and writes PKCS#1
        return openssl("rsa", stdin=rsa_2048_pkcs8)


@pytest.fixture(scope="module")
def rsa_signer(tmp_path_factory, rsa_2048_pkcs8: bytes) -> DKIMSigner:
    return load(write_key(tmp_path_factory.mktemp("rsa"), rsa_2048_pkcs8))


@pytest.fixture(scope="module")
def ed25519_seed() -> bytes:
    return bytes(nacl.signing.SigningKey.generate())


@pytest.fixture
def ed25519_signer(tmp_path: Path, ed25519_seed: bytes) -> DKIMSigner:
    return load(write_key(tmp_path, base64.b64encode(ed25519_seed) + b"\n"))


# ---------------------------------------------------------------- RSA signing


@needs_openssl
@pytest.mark.parametrize("form", ["pkcs8", "pkcs1", "pkcs1-crlf", "der"])
def test_rsa_key_forms_sign_messages_that_verify(tmp_path, rsa_2048_pkcs8, rsa_2048_pkcs1, form):
    data = {
        "pkcs8": rsa_2048_pkcs8,
        "pkcs1": rsa_2048_pkcs1,
        "pkcs1-crlf": rsa_2048_pkcs1.replace(b"\n", b"\r\n"),
        "der": openssl("pkey", "-outform", "DER", stdin=rsa_2048_pkcs8),
    }[form]
    if form == "pkcs1":
        assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    signer = load(write_key(tmp_path, data))
    assert (signer.algorithm, signer.key_bits, signer.key_type) == ("rsa-sha256", 2048, "rsa")
    assert signer.warnings == []

    message = build_message()
    signed = signer.sign(message)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(message), "the original message must follow the signature unchanged"
    assert verify(signed, signer)


@needs_openssl
def test_signature_tags_and_signed_header_list(rsa_signer):
    tags = signature_tags(rsa_signer.sign(build_message()))
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == DOMAIN
    assert tags["s"] == SELECTOR
    signed = tags["h"].split(":")
    # RFC 8058 §3.3: both unsubscribe headers must be covered.
    for name in (
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "reply-to",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "feedback-id",
    ):
        assert name in signed, name
    # Oversigning: present singletons are listed twice, Feedback-ID once.
    assert signed.count("from") == 2
    assert signed.count("list-unsubscribe-post") == 2
    assert signed.count("feedback-id") == 1
    # Only what a reader sees or a receiver acts on is oversigned; structural headers
    # and List-Id are signed once (list software adds its own List-Id when it forwards).
    for name in ("to", "subject", "date", "list-unsubscribe"):
        assert signed.count(name) == 2, name
    for name in ("message-id", "mime-version", "content-type"):
        assert signed.count(name) == 1, name
    # Absent headers are not signed (a relay may legitimately add them).
    assert "cc" not in signed


@needs_openssl
@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Subject", "Your Pro plan was cancelled"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=Nope"),
        ("List-Unsubscribe", "<https://evil.example/u>"),
        ("From", "Acme News <news@evil.example>"),
        ("Reply-To", "attacker@evil.example"),
    ],
)
def test_changing_a_signed_header_breaks_the_signature(rsa_signer, header, value):
    signed = rsa_signer.sign(build_message())
    assert verify(signed, rsa_signer)
    assert not verify(replace_header(signed, header, value), rsa_signer)


@needs_openssl
def test_a_second_from_or_subject_added_in_transit_breaks_the_signature(rsa_signer):
    # Added above the originals: verifiers take instances bottom-up (RFC 6376
    # §5.4.2), so only the extra h= entry (oversigning) catches these; many mail
    # clients show the topmost one.
    signed = rsa_signer.sign(build_message())
    for extra in (
        b"From: CEO <ceo@acme.example>\r\n",
        b"Subject: urgent wire transfer\r\n",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    ):
        assert not verify(extra + signed, rsa_signer), extra
    assert verify(b"X-Added-By-Relay: yes\r\n" + signed, rsa_signer)


@needs_openssl
def test_changes_relaxed_canonicalization_tolerates_still_verify(rsa_signer):
    signed = rsa_signer.sign(build_message())
    # A relay adding a trace header, refolding a header and changing the case of a
    # header name must not break a relaxed/relaxed signature (RFC 6376 §3.4.2).
    relayed = b"Received: from relay.example by mx.example.org; Thu, 1 Jan 2026 00:00:01 +0000\r\n" + signed
    relayed = relayed.replace(b"\r\nSubject: Your Pro plan", b"\r\nsubject:   Your Pro\r\n\tplan", 1)
    assert b"subject:   Your Pro\r\n\tplan" in relayed
    assert verify(relayed, rsa_signer)


@needs_openssl
def test_changing_the_body_breaks_the_signature(rsa_signer):
    signed = rsa_signer.sign(build_message())
    assert not verify(signed.replace(b"Your plan renews soon.", b"Your plan renews NOW.", 1), rsa_signer)


@needs_openssl
def test_lf_messages_get_an_lf_signature_that_verifies(rsa_signer):
    message = build_message(linesep="\n")
    signed = rsa_signer.sign(message)
    header = signed[: len(signed) - len(message)]
    assert b"\r\n" not in header and header.endswith(b"\n")
    assert verify(signed, rsa_signer)


@needs_openssl
@pytest.mark.parametrize("cc", [False, True], ids=["no-cc", "cc"])
@pytest.mark.parametrize("linesep", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_rsa_signature_comes_from_openssl_and_is_dkimpys_byte_for_byte(
    rsa_signer, rsa_2048_pkcs8, pinned_clock, monkeypatch, cc, linesep
):
    message = build_message(cc=cc, linesep=linesep)
    with monkeypatch.context() as patch:
        patch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", refuse_pure_python_rsa)
        signed = rsa_signer.sign(message)
    tags = signature_tags(signed)
    assert tags["t"] == str(PINNED_TIME)
    # RSASSA-PKCS1-v1_5 is deterministic: same key, same hash, same bytes.
    assert signed == sign_with_dkimpy_alone(message, rsa_2048_pkcs8, tags["h"].split(":"))
    assert verify(signed, rsa_signer)
    assert not verify(replace_header(signed, "Subject", "Your Pro plan was cancelled"), rsa_signer)
    assert not verify(signed.replace(b"Your plan renews soon.", b"Your plan renews NOW.", 1), rsa_signer)


@needs_openssl
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    subject=st.text(min_size=1, max_size=120).filter(lambda s: s.strip() and s.splitlines() == [s]),
    body=st.text(max_size=2000),
    linesep=st.sampled_from(["\r\n", "\n"]),
)
def test_openssl_and_dkimpy_rsa_signatures_are_identical_for_any_message(
    rsa_signer, rsa_2048_pkcs8, pinned_clock, subject, body, linesep
):
    message = build_message(subject=subject, body_text=body, linesep=linesep)
    signed = rsa_signer.sign(message)
    assert signed == sign_with_dkimpy_alone(message, rsa_2048_pkcs8, signature_tags(signed)["h"].split(":"))
    assert verify(signed, rsa_signer)


@needs_openssl
def test_key_openssl_refuses_still_signs_through_dkimpy_with_a_warning(tmp_path, rsa_2048_pkcs1):
    # A wrong private exponent: dkimpy signs with the CRT numbers only (and its
    # signatures verify), OpenSSL's key check refuses the key.
    fields = parse_private_key(base64.b64decode(b"".join(rsa_2048_pkcs1.split(b"\n")[1:-2])))
    fields["privateExponent"] += 2
    order = PKCS1_FIELDS
    path = write_key(tmp_path, pem("RSA PRIVATE KEY", der(0x30, b"".join(der_int(fields[n]) for n in order))))
    signer = load(path)
    assert any("falls back" in w and "OpenSSL refuses" in w and str(path) in w for w in signer.warnings)
    assert verify(signer.sign(build_message()), signer)


@needs_openssl
def test_openssl_path_that_fails_its_self_test_is_not_used(tmp_path, rsa_2048_pkcs8, monkeypatch):
    # Stands for a dkimpy release whose internals no longer fit _OpenSSLRSADKIM:
    # the load-time test signature does not verify, so plain dkimpy signs instead.
    with monkeypatch.context() as patch:
        patch.setattr(
            mailer.dkim.openssl._PrehashedRSAKey,
            "sign",
            lambda self, digest: mailer.dkim.openssl._Signature(bytes(256)),
        )
        signer = load(write_key(tmp_path, rsa_2048_pkcs8))
        assert any("falls back" in w and "do not verify" in w for w in signer.warnings)
        assert verify(signer.sign(build_message()), signer)


@needs_openssl
def test_cc_is_signed_when_present(rsa_signer):
    signed = rsa_signer.sign(build_message(cc=True))
    assert signature_tags(signed)["h"].split(":").count("cc") == 2
    assert not verify(replace_header(signed, "Cc", "someone@else.example"), rsa_signer)


def test_message_without_from_is_refused(ed25519_signer):
    message = b"To: jane@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
    with pytest.raises(DKIMError, match="From"):
        ed25519_signer.sign(message)


# ---------------------------------------------------------------- Ed25519


def test_ed25519_seed_key_signs_and_verifies(ed25519_signer, ed25519_seed):
    assert (ed25519_signer.algorithm, ed25519_signer.key_type) == ("ed25519-sha256", "ed25519")
    signed = ed25519_signer.sign(build_message())
    assert signature_tags(signed)["a"] == "ed25519-sha256"
    assert verify(signed, ed25519_signer)
    assert not verify(replace_header(signed, "List-Unsubscribe-Post", "x=y"), ed25519_signer)
    # An Ed25519-only setup is flagged: not every receiver verifies RFC 8463 signatures.
    assert any("Ed25519" in warning and "RSA" in warning for warning in ed25519_signer.warnings)


@pytest.mark.parametrize("form", ["pkcs8-pem", "pkcs8-der", "libsodium-64", "seed-crlf"])
def test_ed25519_key_forms_give_the_same_key(tmp_path, ed25519_seed, form):
    verify_key = nacl.signing.SigningKey(ed25519_seed).verify_key
    data = {
        "pkcs8-pem": pem("PRIVATE KEY", ed25519_pkcs8(ed25519_seed)),
        "pkcs8-der": ed25519_pkcs8(ed25519_seed),
        "libsodium-64": base64.b64encode(ed25519_seed + bytes(verify_key)),
        "seed-crlf": base64.b64encode(ed25519_seed) + b"\r\n",
    }[form]
    signer = load(write_key(tmp_path, data))
    expected = "v=DKIM1; k=ed25519; p=" + verify_key.encode(nacl.encoding.Base64Encoder).decode()
    assert signer.dns_record() == (f"{SELECTOR}._domainkey.{DOMAIN}", expected)
    assert verify(signer.sign(build_message()), signer)


@needs_openssl
def test_ed25519_key_made_by_openssl(tmp_path):
    try:
        data = openssl("genpkey", "-algorithm", "ed25519")
    except subprocess.CalledProcessError:
        pytest.skip("this openssl cannot make Ed25519 keys")
    signer = load(write_key(tmp_path, data))
    assert signer.key_type == "ed25519"
    assert verify(signer.sign(build_message()), signer)


def test_base64_seed_starting_with_zero_is_not_mistaken_for_der(tmp_path):
    # "0" is 0x30, the first byte of a DER SEQUENCE; 1 seed in 64 encodes that way.
    seed = b"\xd0" + bytes(range(31))
    data = base64.b64encode(seed)
    assert data.startswith(b"0")
    signer = load(write_key(tmp_path, data))
    assert signer.key_type == "ed25519"
    assert signer.public_key_matches(
        "k=ed25519; p=" + nacl.signing.SigningKey(seed).verify_key.encode(nacl.encoding.Base64Encoder).decode()
    )


def test_libsodium_key_with_a_wrong_public_half_is_rejected(tmp_path, ed25519_seed):
    data = base64.b64encode(ed25519_seed + bytes(32))
    with pytest.raises(DKIMError, match="does not match"):
        load(write_key(tmp_path, data))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    subject=st.text(min_size=1, max_size=120).filter(lambda s: s.strip() and len(s.splitlines()) == 1),
    body=st.text(max_size=2000),
)
def test_any_subject_and_body_sign_and_verify(ed25519_signer, subject, body):
    message = build_message(subject=subject, body_text=body)
    assert verify(ed25519_signer.sign(message), ed25519_signer)


# ---------------------------------------------------------------- thread safety


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_one_signer_is_safe_to_share_between_threads(request, kind):
    signer: DKIMSigner = request.getfixturevalue(f"{kind}_signer")  # rsa: skipped without openssl
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(15):
                results[worker * 100 + i] = signer.sign(build_message(subject=f"message {worker}-{i}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 120
    for key, signed in results.items():
        assert f"message {key // 100}-{key % 100}".encode() in signed
        assert verify(signed, signer), key


# ---------------------------------------------------------------- bad keys


def test_missing_key_file_is_a_usage_error_naming_the_file(tmp_path):
    path = tmp_path / "nope.pem"
    with pytest.raises(DKIMError) as caught:
        load(path)
    assert caught.value.exit_code == ExitCode.USAGE == 2
    text = str(caught.value)
    assert str(path) in text and "not found" in text
    assert "openssl genrsa" in text and "2048" in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"this is not a key\n", "neither a PEM key"),
        (b"-----BEGIN PRIVATE KEY-----\n!!!!not base64!!!!\n-----END PRIVATE KEY-----\n", "not valid base64"),
        (
            b"-----BEGIN PRIVATE KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEA\n-----END PRIVATE KEY-----\n",
            "does not parse",
        ),
        (
            pem(
                "PRIVATE KEY",
                der(
                    0x30,
                    der_int(0)
                    + der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + der(0x05, b""))
                    + der(0x04, b"junk"),
                ),
            ),
            "not a valid RSA key",
        ),
        (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", "no private key"),
        (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n", "passphrase"),
        (
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nMIIB\n-----END RSA PRIVATE KEY-----\n",
            "passphrase",
        ),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n-----END OPENSSH PRIVATE KEY-----\n", "RSA or Ed25519"),
    ],
)
def test_unusable_key_files_are_refused_with_the_path(tmp_path, content, expected):
    path = write_key(tmp_path, content)
    with pytest.raises(DKIMError) as caught:
        load(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


@needs_openssl
def test_ec_keys_are_refused(tmp_path):
    data = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    with pytest.raises(DKIMError, match="RSA or Ed25519"):
        load(write_key(tmp_path, data))


@needs_openssl
def test_rsa_key_shorter_than_1024_bits_is_refused(tmp_path):
    path = write_key(tmp_path, openssl("genrsa", "512"))
    with pytest.raises(DKIMError) as caught:
        load(path)
    text = str(caught.value)
    assert "RSA-512" in text and "1024" in text and str(path) in text
    assert "openssl genrsa -out" in text and "2048" in text


@needs_openssl
def test_rsa_1024_is_accepted_with_a_warning(tmp_path):
    signer = load(write_key(tmp_path, openssl("genrsa", "1024")))
    assert signer.key_bits == 1024
    assert any("2048" in w and "RFC 8301" in w for w in signer.warnings)
    assert verify(signer.sign(build_message()), signer)


@needs_openssl
def test_a_damaged_rsa_key_is_refused(tmp_path, rsa_2048_pkcs1):
    # Change one CRT exponent: the file still parses, but would sign garbage.
    body = b"".join(rsa_2048_pkcs1.split(b"\n")[1:-2])
    fields = parse_private_key(base64.b64decode(body))
    order = PKCS1_FIELDS
    fields["exponent1"] += 2
    damaged = der(0x30, b"".join(der_int(fields[name]) for name in order))
    with pytest.raises(DKIMError, match="damaged"):
        load(write_key(tmp_path, pem("RSA PRIVATE KEY", damaged)))


def test_unreadable_key_file_is_refused(tmp_path, ed25519_seed):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = write_key(tmp_path, base64.b64encode(ed25519_seed), mode=0o000)
    with pytest.raises(DKIMError, match="permission denied"):
        load(path)


def test_a_directory_is_not_a_key(tmp_path):
    with pytest.raises(DKIMError, match="directory"):
        load(tmp_path)


@pytest.mark.parametrize("field", ["domain", "selector"])
def test_invalid_domain_or_selector_is_refused(tmp_path, ed25519_seed, field):
    path = write_key(tmp_path, base64.b64encode(ed25519_seed))
    kwargs = {"domain": DOMAIN, "selector": SELECTOR, field: "bad; value"}
    with pytest.raises(DKIMError, match=field):
        load(path, **kwargs)


# ---------------------------------------------------------------- permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize(("mode", "who"), [(0o644, "every user"), (0o640, "its group")])
def test_key_readable_by_others_gives_a_warning_with_the_fix(tmp_path, ed25519_seed, mode, who):
    path = write_key(tmp_path, base64.b64encode(ed25519_seed), mode=mode)
    signer = load(path)
    warning = signer.warnings[0]
    assert who in warning and f"chmod 600 {path}" in warning and oct(mode)[2:] in warning


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_private_key_file_gives_no_permission_warning(tmp_path, ed25519_seed):
    path = write_key(tmp_path, base64.b64encode(ed25519_seed), mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not any("chmod" in w for w in load(path).warnings)


# ---------------------------------------------------------------- DNS record


@needs_openssl
def test_rsa_dns_record_is_the_subject_public_key_info_openssl_derives(rsa_signer, rsa_2048_pkcs8):
    name, value = rsa_signer.dns_record()
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}"
    spki = openssl("pkey", "-pubout", "-outform", "DER", stdin=rsa_2048_pkcs8)
    assert value == "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


@needs_openssl
def test_public_key_matches(rsa_signer, rsa_2048_pkcs8, ed25519_signer):
    _, record = rsa_signer.dns_record()
    p = record.split("p=", 1)[1]
    assert rsa_signer.public_key_matches(record)
    assert rsa_signer.public_key_matches(record.encode())
    # Folded p= (RFC 6376 §3.6.1 allows whitespace), no v=, trailing semicolon.
    assert rsa_signer.public_key_matches(f"k=rsa; p={p[:100]} {p[100:250]}\t{p[250:]};")
    # The bare RSAPublicKey form some tools publish.
    pkcs1_public = openssl("rsa", "-RSAPublicKey_out", "-outform", "DER", stdin=rsa_2048_pkcs8)
    assert rsa_signer.public_key_matches("v=DKIM1; p=" + base64.b64encode(pkcs1_public).decode())

    other_rsa = DKIMSigner.from_key_bytes(openssl("genrsa", "1024"), domain=DOMAIN, selector=SELECTOR)
    assert not rsa_signer.public_key_matches(other_rsa.dns_record()[1])
    assert not rsa_signer.public_key_matches(ed25519_signer.dns_record()[1])
    assert not ed25519_signer.public_key_matches(record)
    assert not rsa_signer.public_key_matches("v=DKIM1; k=rsa; p=")  # revoked
    assert not rsa_signer.public_key_matches("v=DKIM1; k=rsa; p=%%%")
    assert not rsa_signer.public_key_matches("v=DKIM2; k=rsa; p=" + p)
    assert not rsa_signer.public_key_matches("garbage")


@needs_openssl
def test_record_from_dns_record_verifies_a_real_signature(rsa_signer):
    # The round trip the user does: publish dns_record(), then receivers verify.
    name, value = rsa_signer.dns_record()
    published = {name + ".": value}
    signed = rsa_signer.sign(build_message())
    assert dkim.verify(signed, dnsfunc=lambda qname, timeout=5: published.get(qname.decode(), "").encode() or None)


def test_repr_shows_no_key_material(ed25519_signer, ed25519_seed):
    text = repr(ed25519_signer)
    assert SELECTOR in text
    assert base64.b64encode(ed25519_seed).decode() not in text


def test_header_lists_are_consistent():
    assert "from" in SIGNED_HEADERS and "list-unsubscribe-post" in SIGNED_HEADERS
    assert set(SIGNED_HEADERS) >= OVERSIGNED_HEADERS
    assert "feedback-id" not in OVERSIGNED_HEADERS
    assert not OVERSIGNED_HEADERS & {"message-id", "mime-version", "content-type", "list-id"}


# ---------------------------------------------------------------- the tag-list parser (RFC 6376 §3.2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("v=DKIM1; k=rsa; p=MIIB", {"v": "DKIM1", "k": "rsa", "p": "MIIB"}),
        ("v=DKIM1;k=rsa;p=MIIB;", {"v": "DKIM1", "k": "rsa", "p": "MIIB"}),  # one trailing ";"
        (" v = DKIM1 ;\tp =\tMIIB ; ", {"v": "DKIM1", "p": "MIIB"}),  # WSP around names, "=", values
        ("v=DKIM1;\r\n p=MIIB\r\n\tIjAN", {"v": "DKIM1", "p": "MIIB\tIjAN"}),  # FWS: folded lines
        ("v=DKIM1; p=MII B  IjAN", {"v": "DKIM1", "p": "MII B  IjAN"}),  # WSP inside a value is kept
        ("v=DKIM1; p=", {"v": "DKIM1", "p": ""}),  # an empty value (a revoked key)
        ("v=DKIM1; p= ;", {"v": "DKIM1", "p": ""}),
        ("a_1=x;B=y", {"a_1": "x", "B": "y"}),  # names: ALPHA *(ALPHA / DIGIT / "_"), case kept
        ("n=a=b", {"n": "a=b"}),  # "=" is a VALCHAR
        ("rua=mailto:d@x.test,mailto:e@y.test!10m", {"rua": "mailto:d@x.test,mailto:e@y.test!10m"}),
        ("", None),  # no tag-spec at all
        ("v=DKIM1; v=DKIM1", None),  # duplicate tags invalidate the whole list
        ("v=DKIM1;; p=MIIB", None),  # an empty tag-spec
        ("v=DKIM1; ;", None),
        ("v=DKIM1; p", None),  # no "="
        ("v=DKIM1; =MIIB", None),  # no name
        ("v=DKIM1; 1p=MIIB", None),  # a name starts with a letter
        ("v=DKIM1; p-x=MIIB", None),  # "-" is not ALNUMPUNC
        ("v DKIM=1", None),  # white space inside a name
        ("v=DKIM1; n=caf\u00e9", None),  # a value is printable ASCII
        ("v=DKIM1;\r\np=MIIB", None),  # a line break not followed by WSP is not folding
    ],
)
def test_parse_tag_list_follows_rfc_6376_section_3_2(text, expected):
    assert parse_tag_list(text) == expected


def test_parse_tag_list_names_are_case_sensitive_unless_folded():
    assert parse_tag_list("V=DKIM1; P=MIIB") == {"V": "DKIM1", "P": "MIIB"}
    assert parse_tag_list("V=DMARC1; P=reject", fold_names=True) == {"v": "DMARC1", "p": "reject"}
    assert parse_tag_list("p=none; P=reject") == {"p": "none", "P": "reject"}
    assert parse_tag_list("p=none; P=reject", fold_names=True) is None  # the same tag twice
