"""Hostile inputs of the kinds an adversarial trial used, generated with a fixed seed.

Templates, CSV values, config values and --where expressions built from escape
probes, amplifiers and broken syntax: each run must end in exit 0, 1 or 2, with no
traceback, within a few seconds (render_timeout is 1 s here).
"""

from __future__ import annotations

import random
import time

import pytest
from cli_fixtures import assert_no_traceback

SEED = 20261202
PIECES = [
    "{{ name }}",
    "{{ lipsum.__globals__.os.popen('touch pwned').read() }}",
    "{{ lipsum['__glo' ~ 'bals__'] }}",
    "{{ (name|attr(field))() }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ lipsum(10**6) }}",
    "{{ '%999999999s'|format(name) }}",
    "{{ name.center(10**9) }}",
    "{{ name * 10**9 }}",
    "{{ 2 ** (10**10) }}",
    "{{ '{:999999999}'.format(name) }}",
    "{% set a = name * 3000000 %}{{ a ~ a ~ a ~ a }}",
    "{{ 1 / 0 }}",
    "{{ name|int + 1 }}",
    "{% if %}",
    "{{ ",
    "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(1) }}",
    "{% if 1 %}" * 300 + "x" + "{% endif %}" * 300,
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
    "\x00",
    "[link]({{ field }})",
]
VALUES = [
    "Ann",
    "__class__",
    "javascript:alert(1)",
    "x" * 5000,
    "../../etc/passwd",
    "a\nBcc: e@x",
    "\u202e\u00e9",
    "10**9",
]
WHERES = [
    "",
    "   ",
    "name == 'Ann'",
    "name.__class__",
    "(name * 10**9)|length > 1",
    "range(10**9)|list|length",
    "lipsum(10**6)|length > 0",
    "(" * 3000 + "1" + ")" * 3000,
    "name|attr('__globals__')",
    "{{ name }}",
]
CONFIG_VALUES = [
    ("send", "retry_backoff", "inf"),
    ("send", "retry_backoff", "nan"),
    ("send", "connections", "100000"),
    ("send", "connections", "9223372036854775807"),
    ("send", "rate", '"' + "9" * 400 + '/s"'),
    ("send", "rate", '"0"'),
    ("smtp", "host", '""'),
    ("smtp", "host", '"127.0.0.1:25"'),
    ("smtp", "helo", '"a\\r\\nMAIL FROM:<x@y>"'),
    ("smtp", "timeout", "nan"),
    ("message", "reply_to", '"a@x.example\\nBcc: e@y.example"'),
    ("message", "list_unsubscribe", '"https://acme.example/u?x={{ lipsum.__globals__ }}"'),
    ("message", "list_unsubscribe", '"https://acme.example/u?x={{ name * 10**9 }}"'),
    ("log", "path", '"a\\u0000b"'),
]


def _cases() -> list[tuple[str, str, str, tuple[str, str, str] | None]]:
    rng = random.Random(SEED)
    cases = []
    for _ in range(24):
        body = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))
        value = rng.choice(VALUES)
        where = rng.choice(WHERES) if rng.random() < 0.3 else None
        config = rng.choice(CONFIG_VALUES) if rng.random() < 0.3 else None
        cases.append((body, value, where or "", config))
    return cases


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@pytest.mark.parametrize("case", range(24))
def test_hostile_inputs_end_cleanly_and_quickly(project, run_cli, case):
    body, value, where, config = _cases()[case]
    project.csv(f"email,name,field\nann@example.com,{_csv_field(value)},upper\nbob@example.com,Bob,__class__\n")
    sections = {"message": ['from = "a@acme.example"'], "send": ["render_timeout = 1"]}
    if config is not None:
        section, key, raw = config
        sections.setdefault(section, []).append(f"{key} = {raw}")
    project.config("".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in sections.items()))
    project.template(f"From: a@acme.example\nSubject: Hi {{{{ name }}}}\n\nHello\n{body}\n")
    args = ["send", "contacts.csv", "mail.txt.j2", "--dry-run"]
    if where:
        args += ["--where", where]
    started = time.monotonic()
    result = run_cli(*args)
    elapsed = time.monotonic() - started
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr[-2000:])
    assert_no_traceback(result)
    assert not project.path("pwned").exists()
    assert elapsed < 15, (elapsed, body[:200], where[:100], config)
