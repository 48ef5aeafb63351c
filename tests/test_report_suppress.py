"""`mailer report` and `mailer suppress` through the real CLI, on send logs written by real sends."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w
from send_support import MAILER, Project, received_addresses


def clear_faults(server) -> None:
    with server.lock:
        server.faults.clear()


def mixed_run(project: Project, server) -> None:
    """One campaign with every status but `sending`: sent, failed, deferred, invalid, suppressed."""
    project.write_contacts(
        [
            "ann@example.com",  # sent
            "al@example.com",  # 552 at DATA: failed
            "amy@example.com",  # suppressed beforehand
            "ben@example.org",  # sent
            "bo@example.org",  # 451 forever: deferred
            "not-an-address",  # invalid
        ]
    )
    server.set_fault("al@example.com", "data", "552 5.2.2 mailbox full")
    server.set_fault("bo@example.org", "rcpt", "451 4.3.0 mailbox busy")
    assert project.cli("suppress", "add", "amy@example.com").exit_code == 0
    outcome = project.send("--yes")
    assert outcome.exit_code == 1, outcome


# ---------------------------------------------------------------- report


def test_report_json_counts_by_status_domain_and_reply(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    mixed_run(project, smtp_server)

    report = project.report("--campaign", "news")

    assert report["version"] == 1 and report["campaign"] == "news" and report["total"] == 6
    assert report["by_status"] == {"sent": 2, "failed": 1, "deferred": 1, "invalid": 1, "suppressed": 1, "sending": 0}
    domains = {row["domain"]: row for row in report["by_domain"]}
    assert domains["example.com"]["total"] == 3
    assert domains["example.com"]["by_status"] == {"sent": 1, "failed": 1, "suppressed": 1}
    assert domains["example.org"]["by_status"] == {"sent": 1, "deferred": 1}
    codes = {row["code"]: row for row in report["by_smtp_code"]}
    assert {code: row["count"] for code, row in codes.items()} == {250: 2, 451: 1, 552: 1}
    assert codes[552]["example_reply"] == "5.2.2 mailbox full"
    assert report["unknown_outcome"] == []
    # Without --campaign: every campaign of the log (only one here).
    assert project.report()["total"] == 6


def test_report_tables_on_stdout(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    mixed_run(project, smtp_server)

    outcome = project.cli("report", "--campaign", "news")

    assert outcome.exit_code == 0, outcome
    text = outcome.stdout
    assert "campaign news: 6 recipients" in text
    assert "by recipient domain" in text and "example.org" in text
    assert "by SMTP reply" in text and "552" in text and "5.2.2 mailbox full" in text
    assert "unknown outcome" not in text


def test_report_failed_csv_is_accepted_back_by_send(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    mixed_run(project, smtp_server)
    retry_csv = tmp_path / "retry.csv"

    outcome = project.cli("report", "--campaign", "news", "--failed", str(retry_csv))

    assert outcome.exit_code == 0, outcome
    assert f"wrote 2 failed and deferred rows to {retry_csv}" in outcome.stderr
    rows = list(csv.DictReader(io.StringIO(retry_csv.read_text(encoding="utf-8"))))
    assert [(r["email"], r["status"], r["smtp_code"]) for r in rows] == [
        ("al@example.com", "failed", "552"),
        ("bo@example.org", "deferred", "451"),
    ]

    clear_faults(smtp_server)
    template = project.write_template(
        "Subject: Second try\n\nHello {{ email }}, last time: {{ status }}.\n", name="retry.txt.j2"
    )
    before = len(smtp_server.messages)
    again = project.send("--yes", "--campaign", "news-retry", "--json", contacts=retry_csv, template=template)

    assert again.exit_code == 0, again
    assert json.loads(again.stdout)["counts"]["sent"] == 2
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages[before:]) == ["al@example.com", "bo@example.org"]
    assert b"last time: failed." in smtp_server.received_by("al@example.com")[0].data
    assert project.statuses("news-retry") == {"al@example.com": "sent", "bo@example.org": "sent"}
    assert project.statuses("news")["al@example.com"] == "failed"  # the first campaign's record stands


def test_report_failed_needs_a_campaign_and_report_needs_a_log(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)

    missing = project.cli("report")
    assert missing.exit_code == 2, missing
    assert "there is no send log here yet" in missing.stderr and not project.log_path.exists()

    mixed_run(project, smtp_server)
    no_campaign = project.cli("report", "--failed", str(tmp_path / "x.csv"))
    assert no_campaign.exit_code == 2, no_campaign
    assert "--failed needs --campaign" in no_campaign.stderr
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------- suppress


def listed(project: Project) -> dict[str, list[str]]:
    outcome = project.cli("suppress", "list")
    assert outcome.exit_code == 0, outcome
    rows = list(csv.reader(io.StringIO(outcome.stdout)))
    assert rows[0] == ["email", "reason", "source", "added_at"]
    return {row[0]: row[1:3] for row in rows[1:]}


def test_suppress_add_remove_list(tmp_path):
    project = Project(tmp_path)

    first = project.cli("suppress", "add", "ann@example.com", "Bob@Example.ORG", "--reason", "asked by phone")
    assert first.exit_code == 0, first
    assert "added 2, already present 0" in first.stderr

    again = project.cli("suppress", "add", "ann@example.com", "ANN@EXAMPLE.COM", "new@example.com")
    assert again.exit_code == 0, again
    assert "added 1, already present 2" in again.stderr

    invalid = project.cli("suppress", "add", "carl@example.com", "broken@")
    assert invalid.exit_code == 2, invalid
    assert "'broken@' is not a valid email address" in invalid.stderr and "Nothing was added" in invalid.stderr

    assert listed(project) == {
        "ann@example.com": ["asked by phone", "manual"],
        "bob@example.org": ["asked by phone", "manual"],  # listed by its key (address_key)
        "new@example.com": ["", "manual"],
    }

    removed = project.cli("suppress", "remove", "bob@EXAMPLE.org", "nobody@example.com")
    assert removed.exit_code == 0, removed
    assert "removed 1, not on the list 1" in removed.stderr
    assert set(listed(project)) == {"ann@example.com", "new@example.com"}


def test_suppress_import_csv_and_plain_list(tmp_path):
    project = Project(tmp_path)
    table = tmp_path / "unsubscribes.csv"
    table.write_text(
        "Name,E-mail,Reason\nXavier,x@example.com,complaint\nBad,bad-address,oops\nYann,y@example.com,\n",
        encoding="utf-8",
    )
    plain = tmp_path / "list.txt"
    plain.write_text("# exported from the shop\nx@example.com\nz@example.com\n\nnot an address\n", encoding="utf-8")

    from_csv = project.cli("suppress", "import", str(table), "--reason", "unsubscribed")

    assert from_csv.exit_code == 0, from_csv
    assert "added 2, already present 0, invalid 1" in from_csv.stderr
    assert f"{table}:3: 'bad-address' is not a valid address; skipped" in from_csv.stderr

    from_plain = project.cli("suppress", "import", str(plain))

    assert from_plain.exit_code == 0, from_plain
    assert "added 1, already present 1, invalid 1" in from_plain.stderr
    assert f"{plain}:5: 'not an address' is not a valid address" in from_plain.stderr
    assert listed(project) == {
        "x@example.com": ["complaint", "import"],
        "y@example.com": ["unsubscribed", "import"],
        "z@example.com": ["", "import"],
    }

    missing = project.cli("suppress", "import", str(tmp_path / "nope.csv"))
    assert missing.exit_code == 2 and "nope.csv" in missing.stderr and "not found" in missing.stderr


def test_suppressed_addresses_are_never_mailed_and_logged_suppressed(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    assert project.cli("suppress", "add", "Jane@EXAMPLE.com", "OMAR@example.net").exit_code == 0
    project.write_contacts(["jane@example.com", "omar@EXAMPLE.NET", "pat@example.com"])

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 0, outcome
    counts = json.loads(outcome.stdout)["counts"]
    assert (counts["sent"], counts["suppressed"]) == (1, 2)
    assert "suppressed 2" in outcome.stderr
    assert received_addresses(smtp_server) == ["pat@example.com"]
    assert project.statuses() == {
        "jane@example.com": "suppressed",
        "omar@example.net": "suppressed",
        "pat@example.com": "sent",
    }
    assert project.delivery("jane@example.com").reason == "on the suppression list"

    # Taken off the list, an address is mailed by the next run; the others stay skipped.
    assert project.cli("suppress", "remove", "JANE@example.com").exit_code == 0
    again = project.send("--yes", "--json")

    assert again.exit_code == 0, again
    counts = json.loads(again.stdout)["counts"]
    assert (counts["sent"], counts["suppressed"], counts["already_done"]) == (1, 1, 1)
    assert received_addresses(smtp_server) == ["pat@example.com", "jane@example.com"]
    assert project.statuses()["omar@example.net"] == "suppressed"


def test_an_internationalized_domain_is_suppressed_in_either_form(smtp_server, tmp_path):
    # Contacts are mailed (and bounce-suppressed) under their ASCII domain
    # (xn--bcher-kva.example), while people type the Unicode one (bücher.example).
    project = Project(tmp_path, smtp_server)
    assert project.cli("suppress", "add", "ann@bücher.example", "bea@xn--bcher-kva.example").exit_code == 0
    project.write_contacts(["ann@bücher.example", "bea@bücher.example", "cid@bücher.example"])

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 0, outcome
    assert json.loads(outcome.stdout)["counts"]["suppressed"] == 2
    assert received_addresses(smtp_server) == ["cid@xn--bcher-kva.example"]

    removed = project.cli("suppress", "remove", "ann@xn--bcher-kva.example", "bea@bücher.example")
    assert removed.exit_code == 0 and "removed 2, not on the list 0" in removed.stderr, removed
    assert listed(project) == {}
    assert project.send("--yes").exit_code == 0
    assert sorted(received_addresses(smtp_server)) == [
        "ann@xn--bcher-kva.example",
        "bea@xn--bcher-kva.example",
        "cid@xn--bcher-kva.example",
    ]


def test_a_suppression_stops_the_address_in_any_case_unicode_included(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    assert project.cli("suppress", "add", "Ann@X.org", "ÄNN@x.org").exit_code == 0
    project.write_contacts(["ann@x.org", "änn@x.org", "ANNA@x.org"])

    outcome = project.send("--yes", "--json")

    assert outcome.exit_code == 0, outcome
    assert json.loads(outcome.stdout)["counts"]["suppressed"] == 2
    assert received_addresses(smtp_server) == ["ANNA@x.org"]  # sent as written
    # Taken off in another case, it is off.
    removed = project.cli("suppress", "remove", "ANN@x.ORG")
    assert removed.exit_code == 0 and "removed 1" in removed.stderr, removed


# ---------------------------------------------------------------- the retry recipe


def readme_retry_recipe() -> str:
    """README's retry recipe, exactly as README prints it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith("mailer report --campaign welcome --failed")]
    assert len(lines) == 1, lines
    return lines[0]


def starter_project(tmp_path: Path, server) -> Path:
    """`mailer init news`, pointed at the loopback relay (no login, no retries)."""
    root = tmp_path / "news"
    done = subprocess.run([*MAILER, "init", str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = tomllib.loads((root / "mailer.toml").read_text(encoding="utf-8"))
    config["smtp"] = {"host": "127.0.0.1", "port": server.port, "security": "none", "timeout": 10}
    config["send"].update(retries=0, retry_backoff=0.1)
    (root / "mailer.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    return root


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` in a shell, with this environment's `mailer` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "MAILER_CONFIG"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )


def test_readme_retry_recipe_resends_the_deferred_rows_with_all_their_columns(smtp_server, tmp_path):
    root = starter_project(tmp_path, smtp_server)
    smtp_server.set_fault("ana@example.org", "rcpt", "451 4.3.0 mailbox busy")
    smtp_server.set_fault("ravi@example.net", "rcpt", "451 4.3.0 mailbox busy")
    first = shell("mailer send contacts.csv welcome.md.j2 --yes", root)
    assert first.returncode == 75, first.stderr
    assert received_addresses(smtp_server) == ["jane@example.com"]
    clear_faults(smtp_server)

    retry = shell(readme_retry_recipe(), root)

    assert retry.returncode == 0, retry.stderr
    rows = list(csv.reader(io.StringIO((root / "retry.csv").read_text(encoding="utf-8"))))
    assert rows[0] == ["email", "First Name", "Last Name", "plan", "status", "smtp_code", "smtp_reply"]
    assert rows[1:] == [
        ["ana@example.org", "Ana", "García", "team", "deferred", "451", "4.3.0 mailbox busy"],
        ["ravi@example.net", "Ravi", "Patel", "free", "deferred", "451", "4.3.0 mailbox busy"],
    ]
    assert sorted(received_addresses(smtp_server)) == ["ana@example.org", "jane@example.com", "ravi@example.net"]
    ana = email.message_from_bytes(smtp_server.received_by("ana@example.org")[0].data, policy=email.policy.default)
    assert str(ana["Subject"]) == "Welcome, Ana!" and str(ana["To"]) == "Ana García <ana@example.org>"
    assert "Invite your team" in ana.get_body(preferencelist=("plain",)).get_content()


def test_the_retry_file_comes_from_any_folder_and_keeps_a_column_named_status(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    (tmp_path / "contacts.csv").write_text(
        "E-Mail;status;name\nann@example.com;gold;Ann\nbo@example.org;silver;Bo\n", encoding="utf-8"
    )
    project.contacts_path = tmp_path / "contacts.csv"
    smtp_server.set_fault("bo@example.org", "rcpt", "451 4.3.0 mailbox busy")
    assert project.send("--yes").exit_code == 75
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    outcome = shell(f"mailer report --campaign news --failed retry.csv -c {project.config_path}", elsewhere)

    assert outcome.returncode == 0, outcome.stderr
    rows = list(csv.reader(io.StringIO((elsewhere / "retry.csv").read_text(encoding="utf-8"))))
    assert rows == [
        ["E-Mail", "status", "name", "mailer_status", "smtp_code", "smtp_reply"],
        ["bo@example.org", "silver", "Bo", "deferred", "451", "4.3.0 mailbox busy"],
    ]


def test_a_contact_file_that_changed_since_the_send_is_named_and_nothing_is_written(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@example.com", "bo@example.org"])
    smtp_server.set_fault("bo@example.org", "rcpt", "451 4.3.0 mailbox busy")
    assert project.send("--yes").exit_code == 75
    project.write_contacts(["ann@example.com", "cy@example.org"])  # bo's row was edited away
    retry_csv = tmp_path / "retry.csv"

    outcome = project.cli("report", "--campaign", "news", "--failed", str(retry_csv))

    assert outcome.exit_code == 2, outcome
    assert f"{project.contacts_path}: 1 of the 1 failed and deferred recipients" in outcome.stderr
    assert "bo@example.org" in outcome.stderr and "changed since the send" in outcome.stderr
    assert not retry_csv.exists()

    project.contacts_path.unlink()
    gone = project.cli("report", "--campaign", "news", "--failed", str(retry_csv))
    assert gone.exit_code == 2 and "the contact file of this campaign's send is gone" in gone.stderr, gone
    assert not retry_csv.exists()


def test_contacts_sent_from_stdin_cannot_be_retried_with_their_columns(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    smtp_server.set_fault("bo@example.org", "rcpt", "451 4.3.0 mailbox busy")
    sent = project.cli("send", "-", str(project.template_path), "--yes", input="email,name\nbo@example.org,Bo\n")
    assert sent.exit_code == 75, sent

    outcome = project.cli("report", "--campaign", "news", "--failed", str(tmp_path / "retry.csv"))

    assert outcome.exit_code == 2, outcome
    assert "were read from standard input" in outcome.stderr


def test_report_of_a_campaign_that_is_not_in_the_log_says_so_and_lists_those_that_are(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    mixed_run(project, smtp_server)

    for args in (
        ["--campaign", "nosuch"],
        ["--campaign", "nosuch", "--json"],
        ["--campaign", "nosuch", "--failed", "x"],
    ):
        outcome = project.cli("report", *args)
        assert outcome.exit_code == 2, outcome
        assert "there is no campaign 'nosuch' in the send log" in outcome.stderr, outcome
        assert "The campaigns there are: news." in outcome.stderr
        assert "0 recipients" not in outcome.stdout and outcome.stdout == ""
    assert not (tmp_path / "x").exists()


def test_report_tables_show_an_internationalized_domain_as_the_user_wrote_it(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@bücher.example", "bo@example.org"])
    assert project.send("--yes").exit_code == 0

    text = project.cli("report", "--campaign", "news").stdout

    assert "bücher.example" in text and "xn--bcher-kva" not in text
