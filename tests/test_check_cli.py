"""`mailer check` through the real CLI, against the loopback SMTP server and the loopback DNS server."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess

import nacl.signing
import pytest
from send_support import Project

from mailer.core.config import DKIMConfig
from mailer.dkim.signer import DKIMSigner

DOMAIN = "acme.example"
SELECTOR = "mail2026"


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the RSA key")
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(subprocess.run(["openssl", "genrsa", "2048"], check=True, capture_output=True).stdout)
    path.chmod(0o600)
    return path


@pytest.fixture
def ready(smtp_server, dns_server, rsa_key, tmp_path):
    """A project whose relay, DNS and key are all in order: (project, zone, signer)."""
    signer = DKIMSigner.load(DKIMConfig(domain=DOMAIN, selector=SELECTOR, private_key=rsa_key))
    zone = {
        (DOMAIN, "MX"): ["10 mx.acme.example."],
        ("mx.acme.example", "A"): ["127.0.0.1"],
        (DOMAIN, "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        (f"_dmarc.{DOMAIN}", "TXT"): [f"v=DMARC1; p=reject; rua=mailto:dmarc@{DOMAIN}"],
        (f"{SELECTOR}._domainkey.{DOMAIN}", "TXT"): [signer.dns_record()[1]],
        ("customers.example", "MX"): ["10 mx.customers.example."],
        ("nomail.example", "MX"): ["0 ."],
    }
    dns_server.set_zone(zone)
    project = Project(tmp_path, smtp_server)
    project.configure(
        dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key": str(rsa_key)},
        message={
            "from": f"Acme News <news@{DOMAIN}>",
            "kind": "marketing",
            "list_unsubscribe": "https://acme.example/u?e={{ email | urlencode }}",
        },
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 2},
    )
    return project, zone, signer


def lines_of(outcome) -> dict[str, str]:
    """'section/name' -> the status word of each check line of the plain output."""
    found = {}
    for line in outcome.stdout.splitlines():
        if line[:4].strip() in ("OK", "WARN", "FAIL"):
            status, rest = line.split(None, 1)
            found[rest.split(":", 1)[0]] = status
    return found


def test_all_ok_exits_0_and_sends_nothing(ready, smtp_server, dns_server):
    project, _, _ = ready

    outcome = project.cli("check")

    assert outcome.exit_code == 0, outcome
    checks = lines_of(outcome)
    assert set(checks.values()) == {"OK"}, outcome.stdout
    for name in (
        "config/config file",
        "config/unsubscribe",
        "config/DKIM key",
        "smtp/connect",
        "smtp/ehlo",
        "smtp/extensions",
        f"dns/MX ({DOMAIN})",
        f"dns/SPF ({DOMAIN})",
        f"dns/DMARC ({DOMAIN})",
        f"dns/DKIM ({DOMAIN})",
    ):
        assert name in checks, f"{name} missing from\n{outcome.stdout}"
    assert smtp_server.connections == 1 and smtp_server.messages == [] and smtp_server.rcpt_attempts == []
    assert dns_server.count(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT") >= 1


def test_all_ok_as_json(ready):
    project, _, _ = ready

    outcome = project.cli("check", "--json")

    assert outcome.exit_code == 0, outcome
    result = json.loads(outcome.stdout)
    assert result["version"] == 1 and result["ok"] is True
    assert {c["section"] for c in result["checks"]} == {"config", "log", "smtp", "dns"}
    assert all(c["status"] == "ok" for c in result["checks"])
    assert all(set(c) == {"section", "name", "status", "detail", "fix"} for c in result["checks"])


@pytest.mark.parametrize(
    "problem, failing, detail, fix",
    [
        ("spf-missing", "SPF", "has no SPF record", f'Publish one TXT record at {DOMAIN}: "v=spf1'),
        ("dmarc-missing", "DMARC", f"no DMARC record at _dmarc.{DOMAIN}", f"Publish a TXT record at _dmarc.{DOMAIN}"),
        (
            "dkim-mismatch",
            "DKIM",
            "does not match [dkim] private_key",
            f'Publish a TXT record at {SELECTOR}._domainkey.{DOMAIN}: "v=DKIM1; k=rsa; p=',
        ),
        ("null-mx", "MX", "null MX", "Replace the null MX"),
    ],
)
def test_a_dns_problem_is_a_fail_line_with_its_fix_and_exit_1(ready, dns_server, problem, failing, detail, fix):
    project, zone, signer = ready
    zone = dict(zone)
    if problem == "spf-missing":
        del zone[(DOMAIN, "TXT")]
    elif problem == "dmarc-missing":
        del zone[(f"_dmarc.{DOMAIN}", "TXT")]
    elif problem == "dkim-mismatch":
        other = base64.b64encode(bytes(nacl.signing.SigningKey.generate().verify_key)).decode()
        zone[(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")] = [f"v=DKIM1; k=ed25519; p={other}"]
    else:
        zone[(DOMAIN, "MX")] = ["0 ."]
    dns_server.set_zone(zone)

    outcome = project.cli("check")

    assert outcome.exit_code == 1, outcome
    checks = lines_of(outcome)
    assert checks[f"dns/{failing} ({DOMAIN})"] == "FAIL"
    assert [name for name, status in checks.items() if status == "FAIL"] == [f"dns/{failing} ({DOMAIN})"]
    text = outcome.stdout
    fail_line = next(line for line in text.splitlines() if line.startswith(f"FAIL dns/{failing}"))
    assert detail in fail_line
    fix_line = text.splitlines()[text.splitlines().index(fail_line) + 1]
    assert fix_line.strip().startswith("fix:") and fix in fix_line
    if problem == "dkim-mismatch":
        assert signer.dns_record()[1] in fix_line  # the exact record to publish

    as_json = json.loads(project.cli("check", "--json").stdout)
    assert as_json["ok"] is False
    (failed,) = [c for c in as_json["checks"] if c["status"] == "fail"]
    assert failed["name"] == f"{failing} ({DOMAIN})" and fix in failed["fix"]


def test_an_unreachable_relay_and_a_missing_password_fail(ready, dns_server):
    project, _, _ = ready
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        project.configure(
            smtp={"port": closed.getsockname()[1], "username": "news", "password_env": "MAILER_TEST_CHECK_PASSWORD"}
        )
        outcome = project.cli("check", env={"MAILER_TEST_CHECK_PASSWORD": None})
    finally:
        closed.close()

    assert outcome.exit_code == 1, outcome
    checks = lines_of(outcome)
    assert checks["config/password"] == "FAIL"
    assert "MAILER_TEST_CHECK_PASSWORD (named by [smtp] password_env) is not set" in outcome.stdout
    assert any(name.startswith("smtp/") and status == "FAIL" for name, status in checks.items()), outcome.stdout


def test_a_broken_config_is_one_fail_line(ready):
    project, _, _ = ready
    project.configure(smtp={"securty": "none"})

    outcome = project.cli("check")

    assert outcome.exit_code == 1, outcome
    assert lines_of(outcome) == {"config/config file": "FAIL"}
    assert "smtp.securty" in outcome.stdout and "mailer.toml" in outcome.stdout


def test_contacts_invalid_duplicates_suppressed_and_dead_domains_are_counted(ready, smtp_server):
    project, _, _ = ready
    assert project.cli("suppress", "add", "sup@customers.example").exit_code == 0
    contacts = project.write_contacts(
        [
            "ann@customers.example",
            "bob@customers.example",
            "ann@CUSTOMERS.example",  # duplicate of line 2
            "not-an-email",  # invalid
            "sup@customers.example",  # suppressed
            "x@gone.example",  # NXDOMAIN
            "y@nomail.example",  # null MX
            "z@nomail.example",
        ]
    )

    outcome = project.cli("check", str(contacts), "--json")

    assert outcome.exit_code == 1, outcome
    checks = {c["name"]: c for c in json.loads(outcome.stdout)["checks"] if c["section"] == "contacts"}
    addresses = checks["addresses"]
    assert addresses["status"] == "fail"
    assert addresses["detail"].startswith("7 valid rows; 1 invalid: line 5")
    assert checks["duplicates"]["status"] == "warn" and checks["duplicates"]["detail"] == "1 duplicate addresses"
    assert checks["suppressed"]["detail"].startswith("1 addresses on the suppression list")
    (domains,) = [c for name, c in checks.items() if name.startswith("recipient domains")]
    assert domains["status"] == "fail"
    assert domains["detail"].startswith("3 domains looked up; 2 cannot receive mail (3 recipients)")
    assert "gone.example" in domains["detail"] and "nomail.example" in domains["detail"]
    assert "Remove these addresses" in domains["fix"]
    assert smtp_server.messages == []

    plain = project.cli("check", str(contacts))
    assert plain.exit_code == 1
    assert "FAIL contacts/recipient domains" in plain.stdout and "WARN contacts/duplicates" in plain.stdout


def test_the_relay_check_does_starttls_verified_and_login_without_showing_the_password(
    ready, make_smtp_server, tls_files
):
    project, _, _ = ready
    password = "Check-pw-90e1-secret"
    server = make_smtp_server(starttls=True, password=password)
    project.configure(
        smtp={
            "port": server.port,
            "security": "starttls",
            "username": "mailer-test",
            "password_env": "MAILER_TEST_CHECK_PASSWORD",
        }
    )
    trusted = {"MAILER_TEST_CHECK_PASSWORD": password, "SSL_CERT_FILE": str(tls_files.ca), "SSL_CERT_DIR": None}

    outcome = project.cli("check", env=trusted)

    assert outcome.exit_code == 0, outcome
    checks = lines_of(outcome)
    assert checks["smtp/starttls"] == checks["smtp/auth"] == checks["config/password"] == "OK"
    assert "certificate verified" in outcome.stdout and "logged in as 'mailer-test'" in outcome.stdout
    assert server.auth_attempts == [("mailer-test", True)] and server.messages == []
    assert password not in outcome.stdout + outcome.stderr
    assert base64.b64encode(password.encode()).decode() not in outcome.stdout + outcome.stderr

    untrusted = project.cli("check", env={**trusted, "SSL_CERT_FILE": None})

    assert untrusted.exit_code == 1, untrusted
    assert lines_of(untrusted)["smtp/starttls"] == "FAIL"
    assert "could not be verified" in untrusted.stdout
    assert len(server.auth_attempts) == 1  # no login over the unverified connection


# ------------------------------------------------- one rule for the relay settings, as send has it


def json_checks(outcome) -> dict[str, dict]:
    return {f"{c['section']}/{c['name']}": c for c in json.loads(outcome.stdout)["checks"]}


@pytest.mark.parametrize(
    "smtp,env,words",
    [
        # An empty variable: check used to say "is set" where send refused to log in.
        ({"password_env": "MAILER_TEST_CHECK_PASSWORD"}, {"MAILER_TEST_CHECK_PASSWORD": ""}, "is empty"),
        ({"password_env": "MAILER_TEST_CHECK_PASSWORD"}, {"MAILER_TEST_CHECK_PASSWORD": None}, "is not set"),
        ({}, {}, "password_env is not"),
        # In clear to a remote host: check said "password ok" and failed only the probe.
        (
            {"host": "192.0.2.1", "password_env": "MAILER_TEST_CHECK_PASSWORD"},
            {"MAILER_TEST_CHECK_PASSWORD": "Pw-4e1b-never-shown"},
            "refusing to send the password to 192.0.2.1",
        ),
    ],
    ids=["empty", "unset", "no-password-env", "cleartext"],
)
def test_check_refuses_the_relay_settings_send_refuses_with_the_same_words(ready, smtp, env, words):
    project, _, _ = ready
    project.configure(smtp={"username": "news", **smtp})
    project.write_contacts(["jane@customers.example"])

    checked = project.cli("check", "--json", env=env)
    sent = project.send("--yes", env=env)

    assert checked.exit_code == 1 and sent.exit_code == 2, (checked, sent)
    password = json_checks(checked)["config/password"]
    assert password["status"] == "fail" and words in password["detail"], password
    assert f"{password['detail']} {password['fix']}" in sent.stderr.replace("\n", " ")
    assert json_checks(checked)["smtp/connection"]["status"] == "fail"  # not tried
    assert "Pw-4e1b-never-shown" not in checked.stdout + sent.stderr
    assert project.server.connections == 0


def test_an_untrusted_relay_certificate_gets_the_tls_verify_hint_send_gives(ready, make_smtp_server):
    project, _, _ = ready
    server = make_smtp_server(starttls=True)
    project.configure(smtp={"port": server.port, "security": "starttls"})
    project.write_contacts(["jane@customers.example"])
    untrusted = {"SSL_CERT_FILE": None, "SSL_CERT_DIR": None}

    checked = project.cli("check", "--json", env=untrusted)
    sent = project.send("--yes", env=untrusted)

    assert checked.exit_code == 1 and sent.exit_code == 2, (checked, sent)
    starttls = json_checks(checked)["smtp/starttls"]
    assert starttls["status"] == "fail" and "could not be verified" in starttls["detail"]
    assert "tls_verify = false" in starttls["fix"]
    assert starttls["fix"] in sent.stderr.replace("\n", " ")


def test_check_and_send_warn_of_a_missing_unsubscribe_in_the_same_words(ready):
    project, _, _ = ready
    project.sections["message"].pop("list_unsubscribe")  # a marketing campaign without one
    project.configure()
    project.write_contacts(["jane@customers.example"])

    checked = project.cli("check", "--json")
    sent = project.send("--yes")

    unsubscribe = json_checks(checked)["config/unsubscribe"]
    assert unsubscribe["status"] == "warn" and "one-click unsubscribe" in unsubscribe["detail"]
    assert sent.exit_code == 0, sent
    assert f"warning: {unsubscribe['detail']} {unsubscribe['fix']}" in sent.stderr.replace("\n", " ")
