"""What receivers check, on the messages a real `mailer send` delivered to the loopback server:
DKIM signatures (verified by dkimpy's own verifier), one-click unsubscribe (RFC 8058),
Feedback-ID, and the warning for bulk mail without unsubscribe."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dkim
import nacl.signing
import pytest
from send_support import Project, addresses, received_addresses

from mailer.core.config import DKIMConfig
from mailer.dkim.signer import DKIMSigner

DOMAIN = "acme.example"
SELECTOR = "mail2026"
UNSUBSCRIBE = {
    "kind": "marketing",
    "list_unsubscribe": "https://acme.test/u?e={{ email | urlencode }}",
    "list_unsubscribe_mailto": "unsubscribe@acme.test",
}

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the RSA keys")


def genrsa(path: Path, bits: int) -> Path:
    path.write_bytes(subprocess.run(["openssl", "genrsa", str(bits)], check=True, capture_output=True).stdout)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the RSA keys")
    return genrsa(tmp_path_factory.mktemp("dkim") / "rsa-2048.pem", 2048)


@pytest.fixture(scope="module")
def ed25519_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "ed25519.key"
    # dkimpy's own form (`dknewkey --ktype ed25519`): the base64 of the 32-byte seed.
    path.write_bytes(base64.b64encode(bytes(nacl.signing.SigningKey.generate())) + b"\n")
    path.chmod(0o600)
    return path


def verifies(data: bytes, signer: DKIMSigner) -> bool:
    """dkimpy's verifier, its DNS answered with the record mailer says to publish."""
    name, value = signer.dns_record()
    asked = []

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        asked.append(qname)
        return value.encode() if qname.decode().rstrip(".") == name else None

    result = dkim.verify(data, dnsfunc=dnsfunc)
    assert asked, "the verifier never looked the key up"
    return result


def signature_tags(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head).decode()
    (line,) = [line for line in unfolded.split("\r\n") if line.lower().startswith("dkim-signature:")]
    tags = {}
    for part in line.split(":", 1)[1].split(";"):
        key, _, value = part.partition("=")
        tags[key.strip()] = re.sub(r"\s+", "", value)
    return tags


def replace_header(data: bytes, name: str, value: str) -> bytes:
    pattern = re.compile(rb"^" + name.encode() + rb":[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.IGNORECASE | re.MULTILINE)
    changed, count = pattern.subn(name.encode() + b": " + value.encode(), data, count=1)
    assert count == 1, f"no {name} header"
    return changed


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


@pytest.mark.parametrize("key_kind", ["rsa", "ed25519"])
def test_every_message_carries_a_dkim_signature_that_verifies(smtp_server, tmp_path, request, key_kind):
    key = request.getfixturevalue(f"{key_kind}_key")
    project = Project(tmp_path, smtp_server)
    project.configure(
        dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)},
        message={**UNSUBSCRIBE, "feedback_id": "spring:news:acme"},
    )
    emails = addresses(4)
    project.write_contacts(emails)
    signer = DKIMSigner.load(DKIMConfig(domain=DOMAIN, selector=SELECTOR, private_key=key))

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert sorted(received_addresses(smtp_server)) == emails
    for message in smtp_server.messages:
        data = message.data
        assert data.startswith(b"DKIM-Signature:")
        assert verifies(data, signer), f"signature of {message.rcpt_tos} does not verify"
        tags = signature_tags(data)
        assert (tags["d"], tags["s"]) == (DOMAIN, SELECTOR)
        assert tags["a"] == ("rsa-sha256" if key_kind == "rsa" else "ed25519-sha256")
        assert tags["c"] == "relaxed/relaxed"
        signed = tags["h"].lower().split(":")
        # RFC 8058 §3.3: one-click unsubscribe counts only when both headers are signed.
        assert {"from", "to", "subject", "list-unsubscribe", "list-unsubscribe-post", "feedback-id"} <= set(signed)
        # Tampering with any signed header, or the body, breaks the signature.
        assert not verifies(replace_header(data, "Subject", "You won a prize"), signer)
        assert not verifies(replace_header(data, "List-Unsubscribe", "<https://evil.test/u>"), signer)
        assert not verifies(replace_header(data, "List-Unsubscribe-Post", "List-Unsubscribe=Nope"), signer)
        assert not verifies(data.replace(b"this is the news", b"this is fake news"), signer)
    if key_kind == "ed25519":
        assert "Ed25519" in outcome.stderr  # prefer RSA: not every receiver verifies Ed25519
    else:
        assert "warning" not in outcome.stderr


def test_one_click_unsubscribe_headers_and_unsubscribe_url_in_the_template(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(message={**UNSUBSCRIBE, "feedback_id": "spring:news:acme"})
    project.write_template("Subject: News\n\nHello {{ name }}.\nUnsubscribe: {{ unsubscribe_url }}\n")
    emails = ["ann+news@example.com", "bob@example.org"]
    project.write_contacts(emails)

    outcome = project.send("--yes")

    assert outcome.exit_code == 0, outcome
    assert "warning" not in outcome.stderr
    for address in emails:
        (message,) = smtp_server.received_by(address)
        parsed = parse(message.data)
        url = "https://acme.test/u?e=" + address.replace("+", "%2B").replace("@", "%40")
        assert parsed["List-Unsubscribe"] == f"<mailto:unsubscribe@acme.test?subject=unsubscribe>, <{url}>"
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert parsed["Feedback-ID"] == "spring:news:acme"
        assert f"Unsubscribe: {url}" in parsed.get_content()


def test_marketing_without_unsubscribe_warns_and_transactional_does_not(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(message={"kind": "marketing"})
    project.write_contacts(addresses(1))

    marketing = project.send("--yes")

    assert marketing.exit_code == 0, marketing
    assert "warning:" in marketing.stderr and "unsubscribe" in marketing.stderr
    assert 'kind = "transactional"' in marketing.stderr
    assert marketing.stdout == ""
    (message,) = smtp_server.messages
    assert b"List-Unsubscribe" not in message.data and b"Feedback-ID" not in message.data

    project.configure(message={"kind": "transactional"})
    transactional = project.send("--yes", "--campaign", "receipts")

    assert transactional.exit_code == 0, transactional
    assert "warning" not in transactional.stderr
    assert len(smtp_server.messages) == 2


@needs_openssl
@pytest.mark.parametrize("problem", ["missing", "short", "garbage"])
def test_an_unusable_dkim_key_exits_2_before_anything_is_sent(smtp_server, tmp_path, problem):
    key = tmp_path / "dkim.pem"
    if problem == "short":
        genrsa(key, 768)
    elif problem == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
        key.chmod(0o600)
    project = Project(tmp_path, smtp_server)
    project.configure(dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": key.name})
    project.write_contacts(addresses(3))

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert str(key) in outcome.stderr
    expected = {"missing": "not found", "short": "RSA-768", "garbage": "does not parse"}[problem]
    assert expected in outcome.stderr
    assert "openssl genrsa" in outcome.stderr  # how to make a good one
    assert smtp_server.connections == 0 and smtp_server.messages == []
    assert not project.log_path.exists()


def test_an_unsubscribe_url_using_an_unknown_column_exits_2_before_sending(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.configure(message={**UNSUBSCRIBE, "list_unsubscribe": "https://acme.test/u?id={{ user_id }}"})
    project.write_contacts(addresses(3))

    outcome = project.send("--yes")

    assert outcome.exit_code == 2, outcome
    assert "mailer.toml" in outcome.stderr and "message.list_unsubscribe" in outcome.stderr
    assert "user_id" in outcome.stderr and "email, name" in outcome.stderr  # what it can use instead
    assert smtp_server.connections == 0
    assert not project.log_path.exists()  # no row was logged as invalid for a config mistake


# ---------------------------------------------------------------- List-Id and SpamAssassin

REPO = Path(__file__).parent.parent
MAILER_COMMAND = [sys.executable, "-c", "from mailer.cli import main; main()"]
needs_spamassassin = pytest.mark.skipif(
    shutil.which("spamassassin") is None, reason="SpamAssassin is not installed (apt-get install spamassassin)"
)


def dry_run_files(args: list[str], cwd: Path, output: Path) -> list[Path]:
    env = {k: v for k, v in os.environ.items() if k != "MAILER_CONFIG"}
    done = subprocess.run(
        [*MAILER_COMMAND, "send", *args, "--dry-run", "--output", str(output), "-q"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return sorted(output.glob("*.eml"))


def bundled_samples(tmp_path: Path) -> dict[str, Path]:
    """The first message of `mailer init`'s starter campaign and of every bundled template."""
    starter = tmp_path / "starter"
    subprocess.run([*MAILER_COMMAND, "init", str(starter)], check=True, capture_output=True)
    samples = {"mailer init": dry_run_files(["contacts.csv", "welcome.md.j2"], starter, tmp_path / "out-starter")[0]}
    for template in sorted((REPO / "templates").glob("*.j2")):
        args = [str(REPO / "samples" / "contacts.csv"), str(template), "-c", str(REPO / "samples" / "mailer.toml")]
        samples[f"templates/{template.name}"] = dry_run_files(args, tmp_path, tmp_path / f"out-{template.name}")[0]
    return samples


def test_marketing_mail_has_a_list_id_from_the_campaign_and_the_from_domain(tmp_path):
    messages = {name: email.message_from_bytes(path.read_bytes()) for name, path in bundled_samples(tmp_path).items()}
    assert messages["mailer init"]["List-Id"] == "<welcome.example.com>"
    assert messages["templates/welcome.md.j2"]["List-Id"] == "<welcome.acme.example>"
    assert messages["templates/invoice.html.j2"]["List-Id"] == "<invoice.acme.example>"


def test_list_id_is_configurable_absent_from_transactional_mail_and_signed(tmp_path):
    project = Project(tmp_path, None)
    project.write_contacts(["ann@example.com"])
    key = genrsa(tmp_path / "dkim.pem", 2048)
    project.configure(
        message={**UNSUBSCRIBE, "list_id": "Acme News <news.acme.example>"},
        dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key)},
    )
    out = tmp_path / "out"
    outcome = project.cli(
        "send", str(project.contacts_path), str(project.template_path), "--dry-run", "--output", str(out)
    )
    assert outcome.exit_code == 0, outcome
    message = email.message_from_bytes(next(out.glob("*.eml")).read_bytes())
    assert message["List-Id"] == "Acme News <news.acme.example>"
    signed = re.sub(r"\s+", "", message["DKIM-Signature"])
    assert "list-id" in re.search(r"h=([^;]*)", signed).group(1).lower().split(":")

    project.configure(message={**UNSUBSCRIBE, "kind": "transactional"})
    out = tmp_path / "out2"
    outcome = project.cli(
        "send", str(project.contacts_path), str(project.template_path), "--dry-run", "--output", str(out)
    )
    assert outcome.exit_code == 0, outcome
    assert "List-Id" not in email.message_from_bytes(next(out.glob("*.eml")).read_bytes())

    project.configure(message={**UNSUBSCRIBE, "list_id": "not a list id"})
    bad = project.cli("send", str(project.contacts_path), str(project.template_path), "--dry-run")
    assert bad.exit_code == 2 and "'message.list_id' 'not a list id' is not a List-Id (RFC 2919)" in bad.stderr, bad


@needs_spamassassin
def test_the_starter_campaign_and_every_bundled_sample_score_at_most_zero_in_spamassassin(tmp_path):
    # `spamassassin -t -L`: local rules only (no network), no DKIM key configured.
    samples = bundled_samples(tmp_path)
    runs = {
        name: subprocess.Popen(
            ["spamassassin", "-t", "-L"], stdin=path.open("rb"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for name, path in samples.items()
    }
    scores = {}
    for name, process in runs.items():
        report = process.communicate(timeout=300)[0].decode("utf-8", "replace")
        status = re.search(r"^X-Spam-Status: .*?score=(-?[0-9.]+)(.*?)(?=^\S)", report, re.MULTILINE | re.DOTALL)
        assert status is not None, report[:2000]
        scores[name] = (float(status.group(1)), " ".join(status.group(2).split()))
    assert all(score <= 0 for score, _ in scores.values()), scores
    assert not any("LIST_PARTIAL_SHORT_MSG" in tests for _, tests in scores.values()), scores
