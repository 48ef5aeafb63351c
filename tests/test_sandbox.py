"""The sandbox's bounds: no template, config value or --where runs away with time or memory."""

from __future__ import annotations

import time

import pytest
from cli_fixtures import assert_fails, dry_run

CONTACTS = "email,name,count\nann@example.com,Ann,3\nbob@example.com,Bob,4\n"
FAST_CONFIG = '[message]\nfrom = "a@acme.example"\n\n[send]\nrender_timeout = 1\n'


def run_template(project, run_cli, body: str, *, header: str = "Subject: Hi\n", config: str = FAST_CONFIG):
    project.csv(CONTACTS)
    project.config(config)
    project.template(f"From: a@acme.example\n{header}\n{body}")
    started = time.monotonic()
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    "body, what",
    [
        ("{% for i in range(10**9) %}x{% endfor %}\n", "range()"),
        ("{{ lipsum(10**6) }}\n", "lipsum()"),
        ("{{ '%999999999s'|format(name) }}\n", "'%999999999s'"),
        ("{{ '%.999999999f'|format(1.5) }}\n", "format"),
        ("{{ '%999999999s' % name }}\n", "'%999999999s'"),
        ("{{ '{:999999999}'.format(name) }}\n", "format width"),
        ("{{ '{:>{w}}'.format(name, w=10**9) }}\n", "format width"),
        ("{{ name * 10**9 }}\n", "multiplication"),
        ("{{ ([name] * 10**9)|length }}\n", "multiplication"),
        ("{{ name.center(10**9) }}\n", "str.center()"),
        ("{{ name|center(10**9) }}\n", "width"),
        ("{{ name.ljust(10**9) }}\n", "str.ljust()"),
        ("{{ name|indent(10**9) }}\n", "indent"),
        ("{{ 2 ** (10**10) }}\n", "too large a number"),
        ("{{ (name * 1000000)|replace('A', name * 1000000) }}\n", "replace"),
        ("{{ (name * 1000000).replace('A', name * 1000000) }}\n", "replace"),
        ("{% set a = name * 3000000 %}{% set a = a ~ a ~ a ~ a %}{{ a|length }}\n", "a value"),
        ("{% set a = name * 3000000 %}{{ (a + a + a + a)|length }}\n", "addition"),
        ("{% set a = name * 3000000 %}{{ [a, a, a, a]|join|length }}\n", "join"),
        ("{{ range(10)|batch(10**9, 'x')|list|length }}\n", "padding"),
        ("{{ range(10)|slice(10**9, 'x')|list|length }}\n", "padding"),
    ],
)
def test_a_runaway_step_ends_with_a_clear_error_naming_the_template_and_line(project, run_cli, body, what):
    result, elapsed = run_template(project, run_cli, "Hello\n" + body)
    assert_fails(result, 2, "mail.txt.j2:5:", "rendering stopped", what)
    assert result.stdout == ""
    assert elapsed < 30, elapsed  # each of these ran for minutes or took gigabytes


@pytest.mark.parametrize(
    "body",
    [
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\n",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in name %}{% endfor %}{% endfor %}{% endfor %}x\n",
        "{% set s = namespace(n=0) %}{% for a in range(100000) %}{% for b in range(100000) %}"
        "{% set s.n = s.n + 1 %}{% endfor %}{% endfor %}{{ s.n }}\n",
    ],
)
def test_a_loop_that_runs_too_long_is_stopped_by_render_timeout(project, run_cli, body):
    result, elapsed = run_template(project, run_cli, "Hello\n" + body)
    assert_fails(result, 2, "mail.txt.j2:5:", "render_timeout")
    assert elapsed < 30, elapsed


def test_output_over_render_max_bytes_is_stopped_at_its_line(project, run_cli):
    body = "Hello\n\n{% for i in range(100000) %}{{ name * 1000 }}{% endfor %}\n"
    result, elapsed = run_template(project, run_cli, body)
    assert_fails(result, 2, "mail.txt.j2:6:", "render_max_bytes")
    assert elapsed < 30, elapsed


def test_the_budget_is_configurable(project, run_cli):
    small = FAST_CONFIG + "render_max_bytes = 1000\n"
    result, _ = run_template(project, run_cli, "Hello\n{{ 'x' * 999 }}\n", config=small)
    assert_fails(result, 2, "mail.txt.j2", "render_max_bytes")
    project.config(FAST_CONFIG)  # the default size takes it
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert len(messages) == 2


def test_a_row_over_the_budget_after_the_first_message_is_that_rows_error(project, run_cli):
    project.csv("email,count\nann@example.com,3\nbob@example.com,1000000000\ncy@example.com,2\n")
    project.config(FAST_CONFIG)
    project.template("From: a@acme.example\nSubject: Hi\n\n{{ 'x' * (count|int) }}\n")
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 1, result.stderr
    assert [m.get_content().strip() for m in messages] == ["xxx", "xx"]
    (problem,) = summary["problems"]
    assert problem["email"] == "bob@example.com" and "render_max_bytes" in problem["reason"]


def test_a_runaway_header_or_config_value_is_stopped_too(project, run_cli):
    result, _ = run_template(project, run_cli, "Hello\n", header="Subject: {{ lipsum(10**6) }}\n")
    assert_fails(result, 2, "mail.txt.j2:2:", "lipsum")
    config = FAST_CONFIG.replace("[send]", 'list_unsubscribe = "https://acme.example/u?x={{ name * 10**9 }}"\n\n[send]')
    result, _ = run_template(project, run_cli, "Hello\n", config=config)
    assert_fails(result, 2, "mailer.toml", "message.list_unsubscribe", "rendering stopped")


@pytest.mark.parametrize(
    "where",
    [
        "(name * 10**9)|length > 1",
        "range(10**9)|list|length > 1",
        "lipsum(10**6)|length > 1",
        "'%999999999s'|format(name)",
    ],
)
def test_a_runaway_where_ends_with_exit_2(project, run_cli, where):
    result, elapsed = run_template(project, run_cli, "Hello\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", where)
    assert_fails(result, 2, "--where", "stopped")
    assert result.stdout == ""


def test_deep_nesting_is_a_clear_error(project, run_cli):
    deep = "{% if 1 %}" * 400 + "x" + "{% endif %}" * 400
    result, _ = run_template(project, run_cli, deep + "\n")
    assert_fails(result, 2, "mail.txt.j2", "nested too deeply")
    brackets = "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"
    result, _ = run_template(project, run_cli, brackets + "\n")
    assert_fails(result, 2, "mail.txt.j2", "nested too deeply")
    project.template("From: a@acme.example\nSubject: Hi\n\nHello\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", "--where", "(" * 5000 + "1" + ")" * 5000)
    assert_fails(result, 2, "--where", "nested too deeply")


def test_a_macro_calling_itself_is_a_clear_error(project, run_cli):
    body = "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(1) }}\n"
    result, _ = run_template(project, run_cli, body)
    assert_fails(result, 2, "mail.txt.j2", "nested too deeply")
