"""The fast signer (mailer.dkim.relaxed) against dkimpy, the reference.

For generated messages (encoded-word and raw UTF-8 headers, folded headers with tabs,
repeated fields, long lines, empty bodies, trailing white space and blank lines, LF
or CRLF, multipart bodies with base64 attachments) each signature must (a) verify
with dkimpy (the public key served through its dnsfunc, no DNS) and (b) be dkimpy's
own DKIM-Signature field, byte for byte, for the same key, header list and time.
"""

from __future__ import annotations

import base64
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailer.dkim.signer
from mailer.compose.message import encode_unstructured, encode_words
from mailer.core.errors import DKIMError
from mailer.dkim.relaxed import canonical_body, fold_tag_list, parse_header_block
from mailer.dkim.signer import DKIMSigner

PINNED_TIME = 1767225600
DOMAIN = "acme.example"
SELECTOR = "mail2026"


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def signers(rsa_pem: bytes) -> dict[str, tuple[DKIMSigner, bytes]]:
    seed = bytes(range(32))
    ed = DKIMSigner.from_key_bytes(base64.b64encode(seed), domain=DOMAIN, selector=SELECTOR)
    rs = DKIMSigner.from_key_bytes(rsa_pem, domain=DOMAIN, selector=SELECTOR)
    return {"ed25519": (ed, base64.b64encode(seed)), "rsa": (rs, rsa_pem)}


@pytest.fixture
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(time=lambda: float(PINNED_TIME))
    monkeypatch.setattr(dkim, "time", clock)
    monkeypatch.setattr(mailer.dkim.signer, "time", clock)


def dkimpy_signature(message: bytes, signer: DKIMSigner, key: bytes, include: list[bytes]) -> bytes:
    newline = message.find(b"\n")
    linesep = b"\r\n" if newline > 0 and message[newline - 1 : newline] == b"\r" else b"\n"
    algorithm = signer.algorithm.encode("ascii")
    reference = dkim.DKIM(message, signature_algorithm=algorithm, linesep=linesep)
    header: bytes = reference.sign(
        SELECTOR.encode(), DOMAIN.encode(), key, canonicalize=(b"relaxed", b"relaxed"), include_headers=include
    )
    return header


def verifies(signed: bytes, signer: DKIMSigner) -> bool:
    name, record = signer.dns_record()

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return record.encode("ascii") if qname.rstrip(b".") == name.encode() else None

    return bool(dkim.verify(signed, dnsfunc=dnsfunc))


# ---------------------------------------------------------------- generated messages

_words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=0, max_size=40).map(
    lambda text: text.replace("\r", "").replace("\n", "")
)
_ascii_words = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=90)
_spaces = st.sampled_from([" ", "  ", "\t", " \t ", ""])


@st.composite
def header_value(draw: st.DrawFn) -> str:
    """A raw value: words with runs of spaces and tabs, maybe folded, maybe trailing white space."""
    words = draw(st.lists(_ascii_words, min_size=0, max_size=6))
    value = ""
    for word in words:
        value += draw(_spaces) + word
        if draw(st.booleans()) and value.strip():
            value += draw(st.sampled_from(["\n ", "\n\t", "\n  "]))
    return value + draw(_spaces)


@st.composite
def field(draw: st.DrawFn) -> str:
    name = draw(
        st.sampled_from(
            ["From", "from", "To", "Cc", "Subject", "SUBJECT", "Date", "Message-ID", "MIME-Version", "Reply-To"]
            + ["List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "Feedback-ID", "X-Mailer", "Received"]
        )
    )
    kind = draw(st.sampled_from(["raw", "encoded", "utf8"]))
    if kind == "encoded":
        # What the builder writes for a non-ASCII Subject or display name.
        text = draw(_words)
        line = encode_unstructured(name, text) if draw(st.booleans()) else f"{name}: " + " ".join(encode_words(text))
        return line.replace("\r\n", "\n")
    if kind == "utf8":
        return f"{name}:{draw(_spaces)}{draw(_words)}"
    return f"{name}:{draw(header_value())}"


@st.composite
def body(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "empty", "multipart"]))
    if kind == "empty":
        return draw(st.sampled_from(["", "\n", "\n\n\n", " \n\t\n"]))
    lines = draw(
        st.lists(
            st.one_of(
                _words,
                st.builds(lambda w, s: w + s, _words, _spaces),
                st.text(alphabet="ab =\t", min_size=900, max_size=1200),  # a long line
            ),
            max_size=12,
        )
    )
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n", "\n \n\t\n"]))
    if kind == "text":
        return text
    attachment = base64.encodebytes(draw(st.binary(max_size=600))).decode("ascii")
    return (
        '--=_m_x\nContent-Type: text/plain; charset="utf-8"\n\n'
        + text
        + "\n--=_m_x\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + attachment
        + "\n--=_m_x--\n"
    )


@st.composite
def message(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(field(), min_size=0, max_size=10))
    fields.insert(draw(st.integers(0, len(fields))), f"From: {draw(st.sampled_from(['a@acme.example', ' Ann <a@x>']))}")
    text = "\n".join(fields) + "\n\n" + draw(body())
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text.encode("utf-8")


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=message())
def test_signature_verifies_and_is_dkimpys_byte_for_byte(signers, pinned_clock, kind: str, data: bytes) -> None:
    signer, key = signers[kind]
    assert signer._sign_digest is not None  # the fast path, not the dkimpy fallback
    signed = signer.sign(data)
    header = signed[: len(signed) - len(data)]
    assert signed.endswith(data)
    include = [name.strip() for name in dkim.util.parse_tag_value(header.split(b":", 1)[1])[b"h"].split(b":")]
    assert header == dkimpy_signature(data, signer, key, include)
    assert verifies(signed, signer)
    assert not verifies(signed.replace(b"From:", b"From: x", 1), signer)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\r\n", b"\n")), crlf=st.booleans())
def test_body_canonicalization_is_dkimpys(data: bytes, crlf: bool) -> None:
    body = data.replace(b"\n", b"\r\n") if crlf else data
    reference = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(
        b"\r\n".join(dkim.re.split(b"\r?\n", body))
    )
    assert canonical_body(body) == reference


@settings(max_examples=200, deadline=None)
@given(value=st.text(alphabet="abc ;=", max_size=400).map(str.encode), name_length=st.integers(0, 20))
def test_folding_is_dkimpys(value: bytes, name_length: int) -> None:
    assert fold_tag_list(value, name_length=name_length, linesep=b"\r\n") == dkim.fold(value, namelen=name_length)


def test_header_block_is_parsed_as_dkimpy_parses_it() -> None:
    message = b"From mbox line\nFrom: a@x\nSubject: one\n\ttwo\r\nTo:b@y \n\nbody\n"
    fields, start = parse_header_block(message)
    reference, reference_body = dkim.rfc822_parse(message)
    assert fields == [tuple(pair) for pair in reference]
    assert message[start:] == b"body\n" and reference_body == b"body\r\n"


def test_a_header_line_that_is_not_a_field_is_an_error(signers) -> None:
    signer, _ = signers["ed25519"]
    with pytest.raises(DKIMError, match="unexpected characters in its header"):
        signer.sign(b"From: a@x\nnot a field\n\nbody\n")
    with pytest.raises(DKIMError, match="continuation line"):
        signer.sign(b" folded: first\nFrom: a@x\n\nbody\n")
    with pytest.raises(DKIMError, match="without a From"):
        signer.sign(b"Subject: hi\n\nbody\n")


def test_a_failing_self_test_keeps_dkimpy_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailer.dkim.signer, "sign_relaxed", lambda message, **kwargs: b"DKIM-Signature: v=1; b=\r\n")
    seed = base64.b64encode(bytes(range(32)))
    signer = DKIMSigner.from_key_bytes(seed, domain=DOMAIN, selector=SELECTOR)
    assert signer._sign_digest is None
    assert any("falls back to dkimpy" in warning for warning in signer.warnings)
    message = b"From: a@acme.example\r\nSubject: s\r\n\r\nbody\r\n"
    assert verifies(signer.sign(message), signer)
