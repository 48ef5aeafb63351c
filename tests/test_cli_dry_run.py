"""The dry run through the real CLI: mbox / jsonl / .eml output, streams, init, preview, help."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import CONFIG_TEXT, all_defects, assert_fails, assert_no_traceback, parse_mbox, parse_message

from mailer.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONTACTS = (
    "email,First Name,plan\n"
    "ann@example.com,Ann,pro\n"
    "bob@example.com,Bob,team\n"
    "not-an-address,Nope,pro\n"
    "cy@example.com,Cy,free\n"
)
TEMPLATE = """\
From: Acme <news@acme.example>
To: {{ first_name }} <{{ email }}>
Subject: Hello {{ first_name }}

Hi {{ first_name }},
From now on your plan is {{ plan }}.
>From the team
"""


@pytest.fixture
def mail_project(project):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    return project


# --- mbox ------------------------------------------------------------------------------------


def test_mbox_on_stdout_and_the_summary_on_stderr(mail_project, run_cli):
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert result.exit_code == 1  # one invalid row
    assert_no_traceback(result)
    messages = parse_mbox(result.stdout_bytes, mail_project.root)
    assert [m["To"].addresses[0].addr_spec for m in messages] == [
        "ann@example.com",
        "bob@example.com",
        "cy@example.com",
    ]
    for message in messages:
        assert all_defects(message) == []
        assert message["Message-ID"] and message["Date"] and message["MIME-Version"] == "1.0"
    # stdout is only the product; the summary and the skipped row are on stderr.
    assert result.stdout_bytes.startswith(b"From ")
    assert b"rows read" not in result.stdout_bytes and b"not-an-address" not in result.stdout_bytes
    assert "rows read 4" in result.stderr and "rendered (dry run) 3" in result.stderr
    assert "contacts.csv:4:" in result.stderr and "not-an-address" in result.stderr


def test_mbox_escapes_body_lines_starting_with_from(mail_project, run_cli):
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    lines = result.stdout_bytes.split(b"\n")
    assert sum(1 for line in lines if line.startswith(b"From ")) == 3  # only the separators
    assert lines.count(b">From now on your plan is pro.") == 1
    assert lines.count(b">>From the team") == 3  # mboxrd: one more '>'
    messages = parse_mbox(result.stdout_bytes, mail_project.root)
    assert len(messages) == 3
    assert ">From now on your plan is pro." in messages[0].get_content()


def test_jsonl_records(mail_project, run_cli):
    (mail_project.path("invoices")).mkdir()
    mail_project.write("invoices/terms.pdf", b"%PDF")
    mail_project.template(TEMPLATE.replace("Subject:", "Attachment: invoices/terms.pdf\nSubject:"))
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--format", "jsonl")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["to"] for r in records] == ["ann@example.com", "bob@example.com", "cy@example.com"]
    assert [r["subject"] for r in records] == ["Hello Ann", "Hello Bob", "Hello Cy"]
    assert [r["line"] for r in records] == [2, 3, 5]
    assert len({r["message_id"] for r in records}) == 3
    for record in records:
        assert record["message_id"].startswith("<") and record["message_id"].endswith("@acme.example>")
        assert isinstance(record["size"], int) and 300 < record["size"] < 5000
        assert record["attachments"] == ["terms.pdf"]
        assert record["recipients"] == [record["to"]]


def test_output_folder_holds_one_eml_per_message(mail_project, run_cli):
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--output", "review")
    assert result.exit_code == 1
    assert result.stdout == ""
    files = sorted(mail_project.path("review").iterdir())
    assert [f.name for f in files] == [
        "000001-ann@example.com.eml",
        "000002-bob@example.com.eml",
        "000003-cy@example.com.eml",
    ]
    for path, name in zip(files, ("Ann", "Bob", "Cy")):
        data = path.read_bytes()
        assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
        message = parse_message(data)
        assert all_defects(message) == []
        assert str(message["Subject"]) == f"Hello {name}"


def test_output_into_a_folder_that_holds_files_is_refused_unless_force(mail_project, run_cli):
    # Two reviews in one folder (20 files from one run, 5 from the next) cannot be told apart.
    review = mail_project.path("review")
    first = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--output", review)
    assert first.exit_code == 1, first.stderr  # one row of CONTACTS is invalid
    before = {path.name: path.read_bytes() for path in review.iterdir()}
    assert len(before) == 3
    mail_project.write("review/notes.txt", "my notes")

    again = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--output", review, "--limit", "1")

    assert_fails(again, 2, "review: the output folder is not empty (3 .eml files, 1 other entries)", "--force")
    assert {path.name: path.read_bytes() for path in review.glob("*.eml")} == before  # untouched

    forced = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--output", review, "--limit", "1", "--force")

    assert forced.exit_code == 1, forced.stderr  # the invalid row still counts
    assert sorted(path.name for path in review.iterdir()) == ["000001-ann@example.com.eml", "notes.txt"]
    assert (review / "notes.txt").read_text() == "my notes"  # --force removes only .eml files


def test_output_into_an_empty_existing_folder_is_fine(mail_project, run_cli):
    mail_project.path("empty").mkdir()
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--output", "empty", "--limit", "2")
    assert result.exit_code == 1, result.stderr  # the invalid row of CONTACTS
    assert len(list(mail_project.path("empty").glob("*.eml"))) == 2


def test_quiet_leaves_only_errors_and_the_summary_line(mail_project, run_cli):
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--quiet", "--format", "jsonl")
    assert len(result.stdout.splitlines()) == 3
    assert "rendered (dry run) 3" in result.stderr


def test_the_dry_run_touches_no_network_and_writes_no_send_log(project, run_cli, smtp_server):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    project.config(
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_server.port}\nsecurity = "none"\n[log]\npath = "send.sqlite3"\n'
    )
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--yes")
    assert result.exit_code == 1
    assert len(parse_mbox(result.stdout_bytes, project.root)) == 3
    assert smtp_server.connections == 0 and smtp_server.messages == []
    assert not project.path("send.sqlite3").exists()


@pytest.mark.parametrize(
    "args, what",
    [
        (["--format", "maildir"], "--format"),
        (["--output", "x"], "--output is for dry runs only"),
        (["--dry-run", "--force"], "--force goes with --output DIR"),
        (["--limit", "-3"], "--limit"),
        (["--campaign", "bad name!"], "campaign name"),
    ],
)
def test_bad_options(mail_project, run_cli, args, what):
    dry = [] if "--output" in args else ["--dry-run"]
    result = run_cli("send", "contacts.csv", "mail.txt.j2", *dry, *args)
    assert_fails(result, 2, what)
    assert result.stdout == ""


def test_json_summary_is_refused_when_stdout_carries_the_dry_run_stream(mail_project, run_cli):
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--json")
    assert result.exit_code == 2
    assert "--json cannot share stdout" in result.stderr
    assert "--output DIR" in result.stderr
    assert result.stdout_bytes == b""


@pytest.mark.parametrize("template", ["welcome.md.j2", "invoice.html.j2", "notice.txt.j2"])
def test_the_bundled_samples_dry_run_cleanly(run_cli, template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILER_CONFIG", raising=False)
    log = REPO / "samples/mailer.sqlite3"  # [log] path of the sample config
    log_before = log.stat().st_mtime_ns if log.exists() else None
    result = run_cli(
        "send",
        REPO / "samples/contacts.csv",
        REPO / "templates" / template,
        "-c",
        REPO / "samples/mailer.toml",
        "--dry-run",
    )
    assert result.exit_code == 0, result.stderr
    messages = parse_mbox(result.stdout_bytes, tmp_path)
    assert len(messages) == 20
    for message in messages:
        assert all_defects(message) == []
        assert message["From"].addresses[0].domain == "acme.example"
        assert message["List-Unsubscribe"]
    if template == "invoice.html.j2":
        first = messages[0]
        (attachment,) = first.iter_attachments()
        assert attachment.get_filename() == "INV-1000.txt"
        assert attachment.get_payload(decode=True) == (REPO / "templates/invoices/INV-1000.txt").read_bytes()
    assert (log.stat().st_mtime_ns if log.exists() else None) == log_before  # a dry run writes no send log


def test_the_bundled_welcome_keeps_its_list_one_list_with_and_without_the_team_item(run_cli, tmp_path, monkeypatch):
    # The {% if %} around the third item split the list in two <ol> (a gap in every browser).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "contacts.csv").write_text(
        "email,First Name,Last Name,plan\nann@example.com,Ann,A,team\nbob@example.com,Bob,B,pro\n", encoding="utf-8"
    )
    args = ["contacts.csv", REPO / "templates/welcome.md.j2", "-c", REPO / "samples/mailer.toml", "--dry-run"]
    result = run_cli("send", *args)
    assert result.exit_code == 0, result.stderr
    team, pro = (parse_mbox(result.stdout_bytes, tmp_path)[i] for i in (0, 1))
    for message, items in ((team, 3), (pro, 2)):
        html = message.get_body(preferencelist=("html",)).get_content()
        assert html.count("<ol") == 1 and html.count("</ol>") == 1, html
        assert html.count("<li") == items and html.count("</li>") == items, html
        text = message.get_body(preferencelist=("plain",)).get_content()
        assert "a month.\n" in text.replace("\r\n", "\n") and "\n\nQuestions?" in text.replace("\r\n", "\n")
    assert "Your team mates" in team.get_body(preferencelist=("html",)).get_content()
    assert "Your team mates" not in pro.get_body(preferencelist=("html",)).get_content()


# --- init --------------------------------------------------------------------------------------


def test_init_writes_a_working_project_and_the_next_command_works(project, run_cli):
    result = run_cli("init", "news")
    assert result.exit_code == 0, result.output
    folder = project.path("news")
    assert sorted(p.name for p in folder.iterdir()) == ["contacts.csv", "mailer.toml", "welcome.md.j2"]
    config = load_config(folder / "mailer.toml")
    assert config.smtp.password_env == "MAILER_SMTP_PASSWORD"
    assert config.message.from_
    assert "wrote" in result.stderr
    (next_line,) = [line for line in result.stdout.splitlines() if line.startswith("Next: ")]
    command = next_line.removeprefix("Next: ")
    assert command.startswith("cd news && mailer send")
    # Run the printed command as a user would (less copies its input when stdout is not a terminal).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MAILER_CONFIG", None)
    completed = subprocess.run(["bash", "-c", command], cwd=project.root, env=env, capture_output=True, timeout=60)
    assert completed.returncode == 0, completed.stderr.decode()
    messages = parse_mbox(completed.stdout, project.root)
    assert [str(m["Subject"]) for m in messages] == ["Welcome, Jane!", "Welcome, Ana!", "Welcome, Ravi!"]
    assert "Invite your team" in messages[1].get_body(("plain",)).get_content()
    assert "Invite your team" not in messages[0].get_body(("plain",)).get_content()
    assert "unsubscribe?u=ana%40example.org" in messages[1].get_body(("html",)).get_content()


def test_init_in_the_working_directory_prints_a_command_without_cd(project, run_cli):
    result = run_cli("init")
    assert result.exit_code == 0, result.output
    assert "Next: mailer send contacts.csv welcome.md.j2 --dry-run" in result.stdout
    assert project.path("mailer.toml").exists()


def test_init_refuses_to_overwrite_without_force(project, run_cli):
    project.write("news/contacts.csv", "email\nmine@example.com\n")
    result = run_cli("init", "news")
    assert_fails(result, 2, "contacts.csv", "already exist", "--force")
    assert project.path("news/contacts.csv").read_text() == "email\nmine@example.com\n"
    assert not project.path("news/mailer.toml").exists()  # nothing was written
    result = run_cli("init", "news", "--force")
    assert result.exit_code == 0, result.output
    assert "jane@example.com" in project.path("news/contacts.csv").read_text()


def test_init_next_command_quotes_a_folder_with_spaces(project, run_cli):
    result = run_cli("init", "my news")
    assert result.exit_code == 0
    assert f"cd {shlex.quote('my news')} && " in result.stdout


# --- preview ------------------------------------------------------------------------------------

PREVIEW_CONTACTS = "email,First Name,plan\nann@example.com,Ann,pro\n\nbad@,Bad,pro\nbob@example.com,Bob,team\n"


@pytest.fixture
def preview_project(project):
    project.csv(PREVIEW_CONTACTS)
    project.template(
        "From: Acme <news@acme.example>\nSubject: Hello {{ first_name }}\n\n# Hi {{ first_name }}\n\nPlan: **{{ plan }}**\n",
        name="mail.md.j2",
    )
    return project


def test_preview_shows_the_first_row_by_default(preview_project, run_cli):
    result = run_cli("preview", "contacts.csv", "mail.md.j2")
    assert result.exit_code == 0, result.output
    assert "Hello Ann" in result.stdout and "ann@example.com" in result.stdout
    assert "# Hi Ann" in result.stdout and "Plan: **pro**" in result.stdout
    assert "HTML part" in result.stdout
    assert "Bob" not in result.stdout


def test_preview_row_counts_data_rows(preview_project, run_cli):
    result = run_cli("preview", "contacts.csv", "mail.md.j2", "--row", "4")
    assert result.exit_code == 0, result.output
    assert "Hello Bob" in result.stdout and "Ann" not in result.stdout


def test_preview_of_a_row_that_is_not_mailed(preview_project, run_cli):
    result = run_cli("preview", "contacts.csv", "mail.md.j2", "--row", "3")
    assert_fails(result, 2, "contacts.csv:4:", "not mailed", "bad@")
    result = run_cli("preview", "contacts.csv", "mail.md.j2", "--row", "40")
    assert_fails(result, 2, "has no row 40")


def test_preview_by_address(preview_project, run_cli):
    result = run_cli("preview", "contacts.csv", "mail.md.j2", "--to", "BOB@example.com")
    assert result.exit_code == 0, result.output
    assert "Hello Bob" in result.stdout
    assert_fails(run_cli("preview", "contacts.csv", "mail.md.j2", "--to", "zed@example.com"), 2, "zed@example.com")
    assert_fails(
        run_cli("preview", "contacts.csv", "mail.md.j2", "--to", "bob@example.com", "--row", "1"), 2, "not both"
    )


def test_preview_writes_the_html_part(preview_project, run_cli):
    result = run_cli("preview", "contacts.csv", "mail.md.j2", "--to", "bob@example.com", "--html", "bob.html")
    assert result.exit_code == 0, result.output
    html = preview_project.path("bob.html").read_text(encoding="utf-8")
    assert "<h1" in html and "Hi Bob</h1>" in html and "<strong>team</strong>" in html
    assert "wrote the HTML part" in result.stderr
    assert "write it out with --html" not in result.stdout and "(written to bob.html)" in result.stdout


def test_preview_piped_shows_long_header_values_whole(preview_project, run_cli):
    url = (
        "https://acme.example/unsubscribe/a-very-long-path-that-does-not-fit-a-terminal-line?u={{ email | urlencode }}"
    )
    preview_project.config(
        CONFIG_TEXT + f'list_unsubscribe = "{url}"\nlist_unsubscribe_mailto = "unsubscribe@acme.example"\n'
    )
    result = run_cli("preview", "contacts.csv", "mail.md.j2")
    assert result.exit_code == 0, result.output
    full = url.replace("{{ email | urlencode }}", "ann%40example.com")
    assert f"List-Unsubscribe: <mailto:unsubscribe@acme.example?subject=unsubscribe>, <{full}>" in result.stdout
    assert "…" not in result.stdout
    assert "(write it out with --html FILE)" in result.stdout


def test_preview_html_of_a_text_template(project, run_cli):
    project.csv(PREVIEW_CONTACTS)
    project.template("From: a@acme.example\nSubject: Hi\n\nplain\n")
    result = run_cli("preview", "contacts.csv", "mail.txt.j2", "--html", "x.html")
    assert_fails(result, 2, "no HTML part")
    assert not project.path("x.html").exists()


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["init"],
        ["send"],
        ["preview"],
        ["check"],
        ["report"],
        ["suppress"],
        ["suppress", "add"],
        ["suppress", "import"],
    ],
    ids=lambda command: " ".join(command) or "mailer",
)
def test_help_exits_0_and_shows_an_example(run_cli, command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert_no_traceback(result)
    assert "Example" in result.stdout
    assert f"mailer {' '.join(command)}".strip() in result.stdout.replace("\n", " ")
