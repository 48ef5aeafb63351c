"""The dry-run speed-up changes no message: the builder and writer against their code before it.

``tests/message_before.py`` is ``mailer/compose/message.py`` as it stood before issue
13's dry-run work. For generated contacts (non-ASCII names, long subjects that need
RFC 2047 encoded-words and folding, values with CR/LF and header-injection attempts,
HTML metacharacters) rendered through generated templates of each kind, both
builders, given the same clock and random token, must produce the same bytes, the
same envelope and log fields, or refuse the row with the same error.
"""

from __future__ import annotations

import time
from pathlib import Path

import message_before
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.compose import dryrun
from mailer.compose.contacts import Contact
from mailer.compose.message import MessageBuilder
from mailer.compose.templates import load_template
from mailer.core.addresses import check_address
from mailer.core.errors import RowError

CLOCK = 1_700_000_000.0

# Values a CSV cell can hold, the hostile ones made likely.
hostile = st.sampled_from(
    [
        "\r\nBcc: evil@x.example",
        "\nX-Injected: 1",
        "a\rb",
        "<script>alert(1)</script>",
        '"quoted" & <b>',
        "Ann, Bob <b@x.example>",
        "=?utf-8?q?fake?=",
        "José Müller-Łukasiewicz",
        "日本語の名前",
        "x" * 120,
        "Ünïcödé " * 15,
        "javascript:alert(1)",
        "",
    ]
)
cell = st.one_of(hostile, st.text(max_size=60), st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
addresses = st.sampled_from(["jane@example.com", "jörg@bücher.example", "ann+tag@x.example", "ünï@example.org"])

HEADERS = [
    "From: {{ sender }} <news@acme.example>",
    "To: {{ name }} <{{ email }}>",
    "Subject: {{ subject }}",
    "Reply-To: support@acme.example",
    "Cc: {{ cc }}",
    "X-Note: {{ name }} / {{ subject }}",
]
BODIES = {
    "txt": "Hi {{ name }},\n\n{{ subject }}\n{% if flag %}flagged{% endif %}\nFrom the team\n",
    "md": "# Hello {{ name }}\n\nYour **{{ subject }}**.\n\n* [link]({{ link }})\n{% if flag %}\n> {{ name }}\n{% endif %}\n",
    "html": '<p>Hi {{ name }}</p><a href="{{ link }}">go</a>{% if flag %}<b>{{ subject }}</b>{% endif %}\n',
}


def contact_of(address: str, **variables: object) -> Contact:
    checked = check_address(address)
    return Contact(2, checked.address, checked.envelope, checked.smtputf8, {"email": checked.address, **variables})


def builders(**options: object) -> tuple[MessageBuilder, message_before.MessageBuilder]:
    token = lambda n: "cd" * n  # noqa: E731 - the random boundary and ID token, fixed
    return (
        MessageBuilder(clock=lambda: CLOCK, token=token, **options),  # type: ignore[arg-type]
        message_before.MessageBuilder(clock=lambda: CLOCK, token=token, **options),  # type: ignore[arg-type]
    )


def build_both(new, old, rendered, contact, extra):
    outcomes = []
    for builder in (new, old):
        try:
            message = builder.build(rendered, contact=contact, extra_headers=extra)
        except RowError as exc:
            outcomes.append(("refused", exc.message))
        except UnicodeEncodeError as exc:
            outcomes.append(("crashed", str(exc)))
        else:
            outcomes.append(
                (
                    message.data,
                    message.message_id,
                    message.sender,
                    message.recipients,
                    message.to,
                    message.subject,
                    message.attachments,
                    message.smtputf8,
                )
            )
    return outcomes


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["txt", "md", "html"]),
    headers=st.lists(st.sampled_from(HEADERS[:3] + HEADERS[3:]), min_size=1, max_size=6, unique=True),
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "address": addresses,
                "sender": cell,
                "name": cell,
                "subject": cell,
                "cc": st.sampled_from(["", "cc@x.example", "{{ name }}", "a@x.example, b@y.example"]),
                "link": st.sampled_from(["https://acme.example/a?b=1&c=2", "javascript:alert(1)", "mailto:a@x", ""]),
                "flag": st.booleans(),
            }
        ),
        min_size=1,
        max_size=4,
    ),
    list_id=st.sampled_from([None, "<news.acme.example>"]),
    default_reply_to=st.sampled_from([None, "Support Désk <help@acme.example>"]),
    unsubscribe=st.booleans(),
)
def test_new_builder_writes_the_same_bytes_as_the_one_before(
    tmp_path_factory, kind, headers, rows, list_id, default_reply_to, unsubscribe
):
    if not any(h.startswith("Subject:") for h in headers):
        headers = [*headers, "Subject: {{ subject }}"]
    folder = tmp_path_factory.mktemp("t")
    path = folder / f"letter.{kind}.j2"
    path.write_text("\n".join(headers) + "\n\n" + BODIES[kind], encoding="utf-8")
    template = load_template(path)
    # One builder pair for all rows, as in a run: the caches fill on the first rows.
    options = dict(default_from="Acme <news@acme.example>", default_reply_to=default_reply_to, list_id=list_id)
    new, old = builders(**options)
    extra = [("List-Unsubscribe", "<https://acme.example/u/abc>")] if unsubscribe else None
    for row in rows:
        contact = contact_of(row["address"], **{k: v for k, v in row.items() if k != "address"})
        try:
            rendered = template.render(contact.variables)
        except RowError:
            continue  # a NUL in a value: refused before the builder, whichever it is
        new_outcome, old_outcome = build_both(new, old, rendered, contact, extra)
        if old_outcome[0] == "crashed":
            # The one change: an ASCII display name before a non-ASCII address (SMTPUTF8)
            # crashed the builder before (formataddr refuses it); now it is built.
            # (or refused, when a later header of the row holds a line break).
            assert new_outcome[0] != "crashed"
            if new_outcome[0] != "refused":
                assert new_outcome[7] is True
                assert f"<{contact.email}>".encode() in new_outcome[0]
            new, old = builders(**options)  # the Message-ID counters went apart
            continue
        assert new_outcome == old_outcome


def test_the_bench_template_is_byte_for_byte_the_same(tmp_path):
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
    source = bench.read_text(encoding="utf-8").split('TEMPLATE = """', 1)[1].split('"""', 1)[0]
    path = tmp_path / "bench.md.j2"
    path.write_text(source, encoding="utf-8")
    template = load_template(path)
    new, old = builders()
    for index, plan in enumerate(["free", "pro", "team"] * 3):
        contact = contact_of(
            f"user{index}@example{index}.com",
            first_name="Zoë" if index % 2 else "Ann",
            last_name="O'Brien <x>",
            plan=plan,
            renewal_date="2026-12-01",
            card_last4="4242",
            seats="7",
            since="2019",
        )
        new_outcome, old_outcome = build_both(new, old, template.render(contact.variables), contact, None)
        assert new_outcome == old_outcome
        assert new_outcome[0] != "refused"


@pytest.mark.parametrize("now", [CLOCK, CLOCK + 0.999, CLOCK + 86_400 * 40 + 0.5])
def test_the_mbox_from_line_is_the_one_formatted_per_message_before(monkeypatch, now):
    before = b"From MAILER-DAEMON " + time.asctime(time.gmtime(now)).encode() + b"\n"
    monkeypatch.setattr(dryrun.time, "time", lambda: now)
    line = dryrun._MboxFromLine()
    assert line() == before
    assert line() == before  # from the cache, within the same second


# The To: fast path (plain ASCII display name, the contact's own address): names from
# the whole printable ASCII range, so that specials, quotes, "=?", doubled and edge
# spaces and lengths on both sides of the fold meet both builders.
ascii_name = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
plain_word = st.text(alphabet="abcXYZ019!#$%&'*+/?^_`{|}~-", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    name=st.one_of(ascii_name, st.lists(plain_word, min_size=1, max_size=5).map(" ".join)),
    address=st.sampled_from(
        ["jane@example.com", "Ann+tag@X.example", "x" * 50 + "@example.org", "jörg@bücher.example", "a@bücher.example"]
    ),
    header=st.sampled_from(
        ["To: {{ name }} <{{ email }}>", "To: {{ name }}<{{ email }}>", "To: {{ name }} <other@x.example>"]
    ),
)
def test_the_to_header_fast_path_writes_what_the_builder_before_wrote(name, address, header):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "letter.txt.j2"
        path.write_text(header + "\nSubject: s\n\nHi\n", encoding="utf-8")
        template = load_template(path)
    new, old = builders(default_from="Acme <news@acme.example>")
    contact = contact_of(address, name=name)
    try:
        rendered = template.render(contact.variables)
    except RowError:
        return
    new_outcome, old_outcome = build_both(new, old, rendered, contact, None)
    if old_outcome[0] == "crashed":
        assert new_outcome[0] != "crashed"  # the SMTPUTF8 case the test above describes
        return
    assert new_outcome == old_outcome
