"""Template files: kinds, escaping, errors with file and line, attachments, header injection."""

from __future__ import annotations

import re

import pytest
from cli_fixtures import all_defects, assert_fails, dry_run

from mailer.compose.templates import html_to_text, load_template

CONTACTS = (
    "email,First Name,Last Name,plan,items\nann@example.com,Ann,Lee,pro,apple;pear\nbob@example.com,Bob,Kim,team,plum\n"
)


def html_of(message) -> str:
    return message.get_body(("html",)).get_content().replace("\r\n", "\n")


def text_of(message) -> str:
    return message.get_body(("plain",)).get_content().replace("\r\n", "\n")


# --- kinds ---------------------------------------------------------------------------------


def test_txt_template_gives_one_text_plain_part(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: Acme <news@acme.example>\nSubject: Hi {{ first_name }}\n\nHello {{ first_name }} <b>{{ plan }}</b>\n"
    )
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert len(messages) == 2
    for message in messages:
        assert message.get_content_type() == "text/plain"
        assert not message.is_multipart()
        assert all_defects(message) == []
    assert messages[0].get_content().replace("\r\n", "\n") == "Hello Ann <b>pro</b>\n"


def test_markdown_template_gives_text_and_html_with_inlined_css(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: Acme <news@acme.example>\nSubject: Hi {{ first_name }}\n\n"
        "# Welcome, {{ first_name }}!\n\nYour **{{ plan }}** plan.\n\n"
        "{% if plan == 'team' %}\nInvite your team at <https://acme.example/team>.\n{% endif %}\n\n"
        "[Account](https://acme.example/account?u={{ email | urlencode }})\n",
        name="welcome.md.j2",
    )
    result, summary, messages = dry_run(project, run_cli, template="welcome.md.j2")
    assert result.exit_code == 0, result.stderr
    ann, bob = messages
    assert ann.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in ann.iter_parts()] == ["text/plain", "text/html"]
    text, html = text_of(ann), html_of(ann)
    assert text.startswith("# Welcome, Ann!\n\nYour **pro** plan.")
    assert re.search(r'<h1 style="[^"]*font-size[^"]*">Welcome, Ann!</h1>', html)
    assert re.search(r'<p style="[^"]*">Your <strong>pro</strong> plan.</p>', html)
    assert re.search(r'<a href="https://acme.example/account\?u=ann%40example.com" style="[^"]*color', html)
    assert "<style" not in html
    assert "Invite your team" not in html and "Invite your team" not in text
    assert "Invite your team" in html_of(bob) and "Invite your team" in text_of(bob)
    assert "<p></p>" not in html and "<p></p>" not in html_of(bob)


def test_html_template_gets_a_generated_text_alternative(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: Acme <news@acme.example>\nSubject: Invoice\n\n"
        "<html><body><p>Hello {{ first_name }} &amp; team,</p>\n"
        '<p>Your <b>{{ plan }}</b> plan. <a href="https://acme.example/{{ plan }}">Details</a></p>\n'
        "<ul>\n{% for item in items.split(';') %}\n<li>{{ item }}</li>\n{% endfor %}\n</ul>\n</body></html>\n",
        name="invoice.html.j2",
    )
    result, summary, messages = dry_run(project, run_cli, template="invoice.html.j2")
    assert result.exit_code == 0, result.stderr
    for message in messages:
        assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
        # The precompiled text alternative says what the rendered HTML says.
        assert normalize(text_of(message)) == normalize(html_to_text(html_of(message)))
    text = text_of(messages[0])
    assert "Hello Ann & team," in text
    assert "[Details](https://acme.example/pro)" in text
    assert re.search(r"\*\s+apple\s*\n\s*\*\s+pear", text)


def normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


def test_a_loop_inside_a_table_takes_the_per_message_path_and_gives_correct_text(project, run_cli):
    project.csv(CONTACTS)
    path = project.template(
        "From: Acme <news@acme.example>\nSubject: Your items\n\n"
        "<html><body><p>Items for {{ first_name }}:</p>\n<table>\n"
        "{% for item in items.split(';') %}\n<tr><td>{{ loop.index }}</td><td>{{ item }}</td></tr>\n{% endfor %}\n"
        "</table>\n<p>Total: {{ items.split(';') | length }}</p></body></html>\n",
        name="items.html.j2",
    )
    assert load_template(path).text_from_html  # the per-message fallback
    result, summary, messages = dry_run(project, run_cli, template="items.html.j2")
    assert result.exit_code == 0, result.stderr
    ann_text = text_of(messages[0])
    assert re.search(r"Items for Ann:\s*\n+\s*1\s+apple\s*\n\s*2\s+pear\s*\n+\s*Total: 2", ann_text), ann_text
    bob_text = text_of(messages[1])
    assert re.search(r"1\s+plum", bob_text) and "apple" not in bob_text
    assert normalize(ann_text) == normalize(html_to_text(html_of(messages[0])))


@pytest.mark.parametrize("kind", ["md", "html"])
def test_csv_values_are_escaped_in_html_but_not_in_text(project, run_cli, kind):
    project.csv('email,First Name\nann@example.com,"<script>alert(1)</script> & Co"\n')
    body = "Hello {{ first_name }}\n" if kind == "md" else "<p>Hello {{ first_name }}</p>\n"
    project.template(f"From: Acme <news@acme.example>\nSubject: Hi\n\n{body}", name=f"mail.{kind}.j2")
    result, summary, (message,) = dry_run(project, run_cli, template=f"mail.{kind}.j2")
    assert result.exit_code == 0, result.stderr
    html = html_of(message)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html
    assert "<script>" not in html
    assert "Hello <script>alert(1)</script> & Co" in text_of(message)


def test_jinja_globals_and_methods_are_usable(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: Acme <news@acme.example>\nSubject: {{ plan.upper() }}\n\n{% for i in range(2) %}{{ i }}{% endfor %} {{ campaign }}\n",
        name="news.txt.j2",
    )
    result, summary, messages = dry_run(project, run_cli, template="news.txt.j2")
    assert result.exit_code == 0, result.stderr
    assert str(messages[0]["Subject"]) == "PRO"
    assert messages[0].get_content().replace("\r\n", "\n") == "01 news\n"


# --- errors found before anything is built -------------------------------------------------


def test_undefined_variable_names_it_the_file_the_line_and_the_columns(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\nSubject: Hi\n\nHello,\n\n{{ frist_name }}\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(
        result,
        2,
        "mail.txt.j2:6:",
        "{{ frist_name }}",
        "Did you mean first_name?",
        "email, First Name, Last Name, plan, items",
    )
    assert result.stdout == ""


def test_undefined_variable_in_a_header(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\nSubject: Hi {{ nickname }}\n\nHello\n")
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "mail.txt.j2:2:", "{{ nickname }}")


def test_unsubscribe_url_needs_the_config(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\nSubject: Hi\n\n{{ unsubscribe_url }}\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mail.txt.j2:4:", "unsubscribe_url", "list_unsubscribe")


@pytest.mark.parametrize(
    "body, line, what",
    [
        ("Hello\n{% if plan %}\nx\n", 6, "Unexpected end of template"),
        ("Hello {{ plan }\n", 4, "unexpected '}'"),
        ("Hello\n\n{{ plan | nosuchfilter }}\n", 6, "No filter named 'nosuchfilter'"),
        ("{% for x in items %}{{ x }}{% endif %}\n", 4, "endif"),
    ],
)
def test_template_syntax_error_names_file_line_and_problem(project, run_cli, body, line, what):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\nSubject: Hi\n\n" + body)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, f"mail.txt.j2:{line}:", "syntax error", what)
    assert ".." not in result.stderr.replace("...", "")


def test_syntax_error_in_a_header(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\nSubject: Hi {{ first_name\n\nHello\n")
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "mail.txt.j2:2:", "syntax error")


def test_missing_subject(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: Acme <news@acme.example>\n\nHello\n")
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "mail.txt.j2", "no Subject:")


@pytest.mark.parametrize(
    "header", ["Message-ID: <x@acme.example>", "Date: today", "MIME-Version: 1.0", "List-Unsubscribe: <https://x>"]
)
def test_reserved_headers_are_refused(project, run_cli, header):
    project.csv(CONTACTS)
    project.template(f"From: Acme <news@acme.example>\nSubject: Hi\n{header}\n\nHello\n")
    name = header.split(":")[0]
    assert_fails(
        run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"),
        2,
        "mail.txt.j2:3:",
        f"sets {name}:",
        "mailer writes itself",
    )


@pytest.mark.parametrize(
    "source, what",
    [
        ("Subject: Hi\nnot a header\n\nbody\n", "expected a header line"),
        ("Subject: Hi\nFrom: a@acme.example", "no blank line"),
        ("Subject: Hi\nSubject: again\n\nbody\n", "appears twice"),
    ],
)
def test_malformed_header_blocks(project, run_cli, source, what):
    project.csv(CONTACTS)
    project.template(source)
    assert_fails(
        run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "-c", project.config()), 2, "mail.txt.j2", what
    )


def test_template_kind_must_be_known(project, run_cli):
    project.csv(CONTACTS)
    project.write("mail.j2", "Subject: Hi\n\nx\n")
    assert_fails(run_cli("send", "contacts.csv", "mail.j2", "--dry-run"), 2, "mail.j2", "*.txt.j2")


def test_template_not_utf8(project, run_cli):
    project.csv(CONTACTS)
    project.write("mail.txt.j2", "From: a@acme.example\nSubject: Hi\n\nGrüße\n".encode("latin-1"))
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "mail.txt.j2:4:", "not valid UTF-8")


def test_no_from_anywhere(project, run_cli):
    project.csv(CONTACTS)
    project.template("Subject: Hi\n\nHello\n")
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "no From:", "[message]")


def test_from_comes_from_the_config_when_the_template_has_none(project, run_cli):
    project.csv(CONTACTS)
    project.config()
    project.template("Subject: Hi\n\nHello\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert messages[0]["From"].addresses[0].addr_spec == "news@acme.example"
    assert messages[0]["To"].addresses[0].addr_spec == "ann@example.com"


# --- rows that cannot be built ---------------------------------------------------------------


def test_a_runtime_error_in_the_template_is_that_rows_problem(project, run_cli):
    project.csv("email,count\nann@example.com,4\nbob@example.com,0\n")
    project.template("From: a@acme.example\nSubject: Hi\n\n{{ 100 // count | int }}\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1
    assert len(messages) == 1 and messages[0].get_content().strip() == "25"
    (problem,) = summary["problems"]
    assert problem["line"] == 3 and problem["kind"] == "error"
    assert "ZeroDivisionError" in problem["reason"] and "mail.txt.j2" in problem["reason"]
    assert "contacts.csv:3:" in result.stderr


def test_attachments_are_relative_to_the_template_folder_and_templated(project, run_cli, monkeypatch):
    project.csv("email,invoice\nann@example.com,INV-1\nbob@example.com,INV-2\n")
    project.write("mail/invoices/INV-1.pdf", b"%PDF ann")
    project.write("mail/invoices/INV-2.pdf", b"%PDF bob")
    project.write("mail/terms.txt", b"terms")
    project.template(
        "From: a@acme.example\nSubject: Invoice {{ invoice }}\nAttachment: invoices/{{ invoice }}.pdf\nAttachment: terms.txt\n\nAttached.\n",
        name="mail/invoice.txt.j2",
    )
    elsewhere = project.path("elsewhere")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the template, not to the working directory
    result, summary, messages = dry_run(project, run_cli, contacts="../contacts.csv", template="../mail/invoice.txt.j2")
    assert result.exit_code == 0, result.stderr
    for message, content in zip(messages, (b"%PDF ann", b"%PDF bob")):
        assert message["Attachment"] is None
        assert message.get_content_type() == "multipart/mixed"
        attachments = [
            (a.get_filename(), a.get_content_type(), a.get_payload(decode=True)) for a in message.iter_attachments()
        ]
        invoice = str(message["Subject"]).split()[-1]
        assert attachments == [(f"{invoice}.pdf", "application/pdf", content), ("terms.txt", "text/plain", b"terms")]
        assert text_of(message) == "Attached.\n"


def test_a_missing_attachment_skips_that_row_only(project, run_cli):
    project.csv("email,invoice\nann@example.com,INV-1\nbob@example.com,INV-404\ncy@example.com,INV-1\n")
    project.write("invoices/INV-1.pdf", b"%PDF")
    project.template("From: a@acme.example\nSubject: Invoice\nAttachment: invoices/{{ invoice }}.pdf\n\nAttached.\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["ann@example.com", "cy@example.com"]
    (problem,) = summary["problems"]
    assert problem["line"] == 3 and problem["email"] == "bob@example.com"
    assert "attachment invoices/INV-404.pdf not found" in problem["reason"]
    assert summary["counts"]["error"] == 1 and summary["counts"]["rendered"] == 2
    assert "contacts.csv:3:" in result.stderr and "INV-404.pdf" in result.stderr


def test_a_value_from_the_csv_cannot_pick_an_attachment_outside_the_templates_folder(project, run_cli):
    secret = project.write("secret.txt", b"do not send")
    project.write("mail/invoices/INV-1.pdf", b"%PDF ann")
    project.write("mail/invoices/2026/INV-2.pdf", b"%PDF bob")
    project.csv(
        "email,invoice\n"
        "ann@example.com,INV-1.pdf\n"
        "bob@example.com,2026/INV-2.pdf\n"  # a subfolder of invoices/ is fine
        "eve@example.com,../../secret.txt\n"
        f"mal@example.com,{secret}\n"  # an absolute path
        "cy@example.com,2026/../../invoices/INV-1.pdf\n"  # leaves and comes back: still inside
    )
    project.template(
        "From: a@acme.example\nSubject: Invoice\nAttachment: invoices/{{ invoice }}\n\nAttached.\n",
        name="mail/invoice.txt.j2",
    )
    result, summary, messages = dry_run(project, run_cli, template="mail/invoice.txt.j2")
    assert result.exit_code == 1
    assert [m["To"].addresses[0].addr_spec for m in messages] == [
        "ann@example.com",
        "bob@example.com",
        "cy@example.com",
    ]
    assert all(b"do not send" not in a.get_payload(decode=True) for m in messages for a in m.iter_attachments())
    problems = {p["email"]: p["reason"] for p in summary["problems"]}
    assert set(problems) == {"eve@example.com", "mal@example.com"}
    assert "leads outside" in problems["eve@example.com"] and "invoices" in problems["eve@example.com"]
    assert "not found" in problems["mal@example.com"]  # under invoices/, like any other value
    assert "contacts.csv:4:" in result.stderr and "contacts.csv:5:" in result.stderr


def test_a_wholly_templated_attachment_path_stays_in_the_templates_folder(project, run_cli):
    secret = project.write("secret.txt", b"do not send")
    project.write("mail/terms.txt", b"terms")
    project.csv(f"email,file\nann@example.com,terms.txt\nmal@example.com,{secret}\neve@example.com,../secret.txt\n")
    project.template("From: a@acme.example\nSubject: Hi\nAttachment: {{ file }}\n\nHi.\n", name="mail/hi.txt.j2")
    result, summary, messages = dry_run(project, run_cli, template="mail/hi.txt.j2")
    assert result.exit_code == 1
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["ann@example.com"]
    reasons = {p["email"]: p["reason"] for p in summary["problems"]}
    assert set(reasons) == {"mal@example.com", "eve@example.com"}
    assert all("leads outside" in reason for reason in reasons.values())


def test_a_literal_attachment_path_may_reach_outside_the_templates_folder(project, run_cli):
    project.write("shared/terms.txt", b"terms")
    project.csv("email\nann@example.com\n")
    project.template(
        "From: a@acme.example\nSubject: Hi\nAttachment: ../shared/terms.txt\n\nHi.\n", name="mail/hi.txt.j2"
    )
    result, summary, messages = dry_run(project, run_cli, template="mail/hi.txt.j2")
    assert result.exit_code == 0, result.stderr
    assert [a.get_payload(decode=True) for a in messages[0].iter_attachments()] == [b"terms"]


# --- header injection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["Subject: Hi {{ first_name }}", "To: {{ first_name }} <{{ email }}>", "X-Name: {{ first_name }}"]
)
def test_a_line_break_from_the_csv_in_a_header_rejects_the_row(project, run_cli, header):
    project.csv(
        'email,first_name\nann@example.com,Ann\nbob@example.com,"Bob\r\nBcc: victim@evil.test"\ncy@example.com,"Cy\nX-Evil: 1"\n'
    )
    project.template(
        f"From: a@acme.example\n{header}\n{'Subject: Hi' if 'Subject' not in header else 'X-Mailer-Test: 1'}\n\nHello {{{{ first_name }}}}\n"
    )
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["ann@example.com"]
    assert {p["line"] for p in summary["problems"]} == {3, 5}
    for problem in summary["problems"]:
        assert problem["kind"] == "error"
        assert "line break" in problem["reason"] and "header injection" in problem["reason"]
    for path in project.root.glob("out*/*.eml"):
        data = path.read_bytes()
        assert b"victim@evil.test" not in data and b"X-Evil" not in data
    assert "contacts.csv:3:" in result.stderr and "contacts.csv:5:" in result.stderr


def test_a_line_break_from_the_csv_in_the_body_is_fine(project, run_cli):
    project.csv('email,first_name,note\nbob@example.com,Bob,"line one\r\nBcc: victim@evil.test"\n')
    project.template("From: a@acme.example\nSubject: Hi {{ first_name }}\n\n{{ note }}\n")
    result, summary, (message,) = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert message["Bcc"] is None
    assert "line one\nBcc: victim@evil.test" in message.get_content().replace("\r\n", "\n")
    assert [a.addr_spec for a in message["To"].addresses] == ["bob@example.com"]


# --- Markdown with statements: the HTML stays well-formed ----------------------------------

_VOID = {"meta", "br", "hr", "img", "input", "link"}


def open_tags_left(html: str) -> list[str]:
    """Tags opened and not closed (or closed out of order) in ``html``: [] when well nested."""
    from html.parser import HTMLParser

    stack: list[str] = []
    errors: list[str] = []

    class Checker(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag not in _VOID:
                stack.append(tag)

        def handle_endtag(self, tag):
            if stack and stack[-1] == tag:
                stack.pop()
            else:
                errors.append(f"</{tag}> closes {stack[-1] if stack else 'nothing'}")

    Checker().feed(html)
    return errors + stack


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "Your items:\n\n{% for item in items.split(';') %}\n* {{ item }}\n{% endfor %}\n\nBye\n",
            r"<ul>\s*<li>apple</li>\s*<li>pear</li>\s*</ul>\s*<p[^>]*>Bye</p>",
        ),
        (
            "Steps:\n\n{% for item in items.split(';') %}\n1. {{ item }}\n{% endfor %}\n",
            r"<ol>\s*<li>apple</li>\s*<li>pear</li>\s*</ol>",
        ),
        (
            "1. One\n2. Two\n{% if plan == 'pro' %}\n3. Pro only\n{% endif %}\n\nEnd\n",
            r"<li>Two</li>\s*</ol>\s*<ol start=\"3\">\s*<li>Pro only</li>\s*</ol>\s*<p[^>]*>End</p>",
        ),
        (
            "Hello {{ first_name }}\n{% if plan == 'pro' %}\nyou are **pro**\n{% endif %}\nbye\n",
            r"<p[^>]*>Hello Ann</p>\s*<p[^>]*>you are <strong>pro</strong></p>\s*<p[^>]*>bye</p>",
        ),
        (
            "* first\n{% for item in items.split(';') %}\n* {{ item }} {% if loop.last %}(last){% endif %}\n{% endfor %}\n",
            r"<li>first</li>\s*</ul>\s*<ul>\s*<li>apple </li>\s*<li>pear \(last\)</li>\s*</ul>",
        ),
        (
            "{% for item in items.split(';') %}\n* {% for c in item %}{{ c }}{% endfor %}\n{% endfor %}\n",
            r"<ul>\s*<li>apple</li>\s*<li>pear</li>\s*</ul>",
        ),
    ],
    ids=["loop-ul", "loop-ol", "if-in-list", "if-paragraph", "loop-after-item", "nested-loop"],
)
def test_statements_in_markdown_keep_the_html_well_formed(project, run_cli, body, expected):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\nSubject: Hi\n\n" + body, name="mail.md.j2")
    result, summary, messages = dry_run(project, run_cli, template="mail.md.j2")
    assert result.exit_code == 0, result.stderr
    html = html_of(messages[0])
    assert open_tags_left(html) == [], html
    assert re.search(expected, html), html
    assert open_tags_left(html_of(messages[1])) == []


def test_the_bundled_welcome_template_is_well_formed_for_every_plan(run_cli, tmp_path, monkeypatch):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "send",
        repo / "samples/contacts.csv",
        repo / "templates/welcome.md.j2",
        "-c",
        repo / "samples/mailer.toml",
        "--dry-run",
        "--output",
        "out",
    )
    assert result.exit_code == 0, result.stderr
    from cli_fixtures import parse_message

    plans = set()
    for path in sorted((tmp_path / "out").glob("*.eml")):
        message = parse_message(path.read_bytes())
        html = html_of(message)
        assert open_tags_left(html) == [], html
        team = "Your team mates can join" in html
        plans.add(team)
        assert team == ("Your team mates can join" in text_of(message))
    assert plans == {True, False}


# --- the sandbox: a template cannot reach Python, files, the environment or mailer -----------

SECRET = "s3cret-Pa55word-never-shown"

_ESCAPES = [
    "{{ lipsum.__globals__['os'].popen('touch pwned').read() }}",
    "{{ lipsum.__globals__.__builtins__.open('secret.txt').read() }}",
    '{{ lipsum.__globals__["os"].environ["MAILER_SMTP_PASSWORD"] }}',
    "{{ cycler.__init__.__globals__.os.popen('touch pwned').read() }}",
    "{{ joiner.__init__.__globals__.os.environ.MAILER_SMTP_PASSWORD }}",
    "{{ namespace.__init__.__globals__.os.system('touch pwned') }}",
    "{{ self._TemplateReference__context.environment.globals }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ range.__globals__ }}",
    "{{ lipsum['__glo' ~ 'bals__']['os'].popen('touch pwned').read() }}",
    "{{ lipsum|attr('__globals__') }}",
    "{{ '{0.__globals__[os].environ[MAILER_SMTP_PASSWORD]}'.format(lipsum) }}",
    "{% set g = lipsum|attr('__glo' ~ 'bals__') %}{{ g.os.popen('touch pwned').read() }}",
    "{{ config.__class__ }}",
    "{{ request.application.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
]


@pytest.mark.parametrize("probe", _ESCAPES)
@pytest.mark.parametrize("where", ["body", "header", "attachment", "html", "md"])
def test_a_template_cannot_escape_the_sandbox(project, run_cli, monkeypatch, probe, where):
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", SECRET)
    project.write("secret.txt", "top secret file content")
    project.csv(CONTACTS)
    name = {"html": "mail.html.j2", "md": "mail.md.j2"}.get(where, "mail.txt.j2")
    header = f"Subject: Hi {probe}\n" if where == "header" else "Subject: Hi\n"
    attachment = f"Attachment: files/{probe}\n" if where == "attachment" else ""
    body = "Hello\n" if where in ("header", "attachment") else f"Hello\n{probe}\n"
    project.template(f"From: Acme <news@acme.example>\n{header}{attachment}\n{body}", name=name)
    result = run_cli("send", "contacts.csv", name, "--dry-run")
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout[:500])
    assert "Traceback" not in result.output
    assert name in result.stderr
    assert not project.path("pwned").exists()
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "top secret" not in result.stdout and "top secret" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "probe",
    [
        "{{ lipsum.__globals__['os'].popen('touch pwned').read() }}",
        "{{ lipsum.__globals__.os.environ.MAILER_SMTP_PASSWORD }}",
        "{{ lipsum['__glo' ~ 'bals__'].os.environ.MAILER_SMTP_PASSWORD }}",
    ],
)
def test_the_configs_list_unsubscribe_template_is_sandboxed_too(project, run_cli, monkeypatch, probe):
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", SECRET)
    project.csv(CONTACTS)
    project.config(
        '[smtp]\nhost = "127.0.0.1"\nport = 2525\nsecurity = "none"\n\n'
        f'[message]\nfrom = "a@acme.example"\nlist_unsubscribe = "https://acme.example/u?x={probe}"\n'
    )
    project.template("Subject: Hi\n\nHello\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout[:500])
    assert "Traceback" not in result.output
    assert "message.list_unsubscribe" in result.stderr and "mailer.toml" in result.stderr
    assert not project.path("pwned").exists()
    assert SECRET not in result.output


def test_a_sandbox_violation_behind_a_condition_is_found_before_anything_is_built(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: a@acme.example\nSubject: Hi\n\nHello\n{% if email == 'bob@example.com' %}\n"
        "{{ lipsum.__globals__.os.popen('touch pwned').read() }}\n{% endif %}\n"
    )
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mail.txt.j2:6:", "__globals__")
    assert result.stdout == "" and not project.path("pwned").exists()


def test_the_sandbox_keeps_ordinary_templates_working(project, run_cli):
    project.csv(CONTACTS)
    project.template(
        "From: a@acme.example\nSubject: {{ first_name|upper }} {{ '%s-%03d'|format(plan, 7) }}\n\n"
        "{% set ns = namespace(n=0) %}{% for item in items.split(';') %}{% set ns.n = ns.n + 1 %}"
        "{{ loop.index }}:{{ item.title() }} {% endfor %}{{ ns.n }} {{ '{}!'.format(last_name) }}"
        " {{ {'a': 1}.items()|list }} {{ cycler('x', 'y').next() }}\n"
    )
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert str(messages[0]["Subject"]) == "ANN pro-007"
    assert messages[0].get_content().replace("\r\n", "\n") == "1:Apple 2:Pear 2 Lee! [('a', 1)] x\n"


def test_a_sandbox_violation_built_at_render_time_names_the_line(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\nSubject: Hi\n\nHello\n{{ '{0.__globals__}'.format(lipsum) }}\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mail.txt.j2:5:", "sandbox", "__globals__")
    assert result.stdout == ""


def test_a_sandbox_violation_on_a_later_row_is_that_rows_error(project, run_cli):
    project.csv("email,name,field\nann@example.com,Ann,upper\nbob@example.com,Bob,__class__\n")
    project.template("From: a@acme.example\nSubject: Hi\n\n{{ (name|attr(field))() }}\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1, result.stderr
    assert [m.get_content().strip() for m in messages] == ["ANN"]
    (problem,) = summary["problems"]
    assert problem["email"] == "bob@example.com" and "sandbox" in problem["reason"] and "__class__" in problem["reason"]


# --- links and special files as attachments ----------------------------------------------


def test_a_link_inside_the_attachment_folder_cannot_lead_out_of_it(project, run_cli):
    import os

    project.write("secret.pdf", b"do not send")
    project.write("mail/secret.pdf", b"do not send either")
    project.write("mail/invoices/INV-1.pdf", b"%PDF ann")
    project.write("mail/invoices/real/INV-2.pdf", b"%PDF bob")
    os.symlink("../../secret.pdf", project.path("mail/invoices/link.pdf"))
    os.symlink("..", project.path("mail/invoices/dirlink"))
    os.symlink("real", project.path("mail/invoices/inside"))  # a link that stays inside is fine
    project.csv(
        "email,invoice\n"
        "ann@example.com,INV-1.pdf\n"
        "eve@example.com,link.pdf\n"
        "mal@example.com,dirlink/secret.pdf\n"
        "bob@example.com,inside/INV-2.pdf\n"
    )
    project.template(
        "From: a@acme.example\nSubject: Invoice\nAttachment: invoices/{{ invoice }}\n\nAttached.\n",
        name="mail/invoice.txt.j2",
    )
    result, summary, messages = dry_run(project, run_cli, template="mail/invoice.txt.j2")
    assert result.exit_code == 1, result.stderr
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["ann@example.com", "bob@example.com"]
    assert all(b"do not send" not in a.get_payload(decode=True) for m in messages for a in m.iter_attachments())
    reasons = {p["email"]: p["reason"] for p in summary["problems"]}
    assert set(reasons) == {"eve@example.com", "mal@example.com"}
    assert all("leads outside" in reason for reason in reasons.values())


def test_a_pipe_is_refused_as_an_attachment(project, run_cli):
    import os

    project.write("files/ok.txt", b"fine")
    os.mkfifo(project.path("files/pipe.txt"))
    project.csv("email,file\nann@example.com,ok.txt\nbob@example.com,pipe.txt\n")
    project.template("From: a@acme.example\nSubject: Hi\nAttachment: files/{{ file }}\n\nHi.\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1, result.stderr
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["ann@example.com"]
    (problem,) = summary["problems"]
    assert problem["email"] == "bob@example.com" and "not a regular file" in problem["reason"]


def test_a_device_is_refused_as_an_attachment(project, run_cli):
    project.csv("email\nann@example.com\n")
    project.template("From: a@acme.example\nSubject: Hi\nAttachment: /dev/zero\n\nHi.\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1, result.stderr
    assert messages == []
    (problem,) = summary["problems"]
    assert "/dev/zero is not a regular file" in problem["reason"]


# --- inputs that would mean something else than they say ------------------------------------


@pytest.mark.parametrize("where", ["", "   "])
def test_an_empty_where_is_refused_rather_than_selecting_everyone(project, run_cli, where):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\nSubject: Hi\n\nHello\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", where)
    assert_fails(result, 2, "--where is empty")
    assert result.stdout == ""


def test_a_javascript_link_from_the_csv_is_neutralized_in_html(project, run_cli):
    project.csv(
        "email,url\nann@example.com,https://acme.example/a\nbob@example.com,javascript:alert(1)\n"
        'cy@example.com, JaVa\tScRiPt:alert(2)\ndee@example.com,"data:text/html;base64,PHNjcmlwdD4="\n'
        "eve@example.com,mailto:help@acme.example\nfay@example.com,/relative/path\n"
    )
    for name, body in (
        ("mail.md.j2", "Hello [click]({{ url }}) and ![x]({{ url }})\n"),
        ("mail.html.j2", "<p>Hello <a href=\"{{ url }}\">click</a> <a href='{{- url -}}'>b</a></p>\n"),
    ):
        project.template(f"From: a@acme.example\nSubject: Hi\n\n{body}", name=name)
        result, summary, messages = dry_run(project, run_cli, template=name)
        assert result.exit_code == 0, result.stderr
        hrefs = [re.findall(r'(?:href|src)="([^"]*)"', html_of(m)) for m in messages]
        kept = [h[0] for h in hrefs]
        assert kept == ["https://acme.example/a", "#", "#", "#", "mailto:help@acme.example", "/relative/path"], kept
        assert all("javascript" not in html_of(m).lower() for m in messages)
