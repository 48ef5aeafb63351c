"""mailer/bounces/reports.py: DSN, ARF and heuristic reports, classification, hostile input."""

from __future__ import annotations

import bounce_fixtures as fx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.bounces.reports import BounceKind, ReportError, parse_report

ANN = "ann@example.org"
MID = "<20261202130000.1.abc@acme.example>"
VERP = "bounces+d3q6x4zzd5nbs7xqwm2rjyxq4eoymw6a@acme.example"


@pytest.mark.parametrize(
    ("build", "fmt", "kind", "status"),
    [
        (lambda: fx.postfix_dsn(ANN, MID, VERP), "dsn", BounceKind.HARD, "5.1.1"),
        (lambda: fx.postfix_delayed(ANN, MID, VERP), "dsn", BounceKind.SOFT, "4.4.1"),
        (
            lambda: fx.postfix_dsn(ANN, MID, VERP, status="4.2.0", diagnostic="smtp; 452 4.2.0 try later"),
            "dsn",
            BounceKind.SOFT,
            "4.2.0",
        ),
        (
            lambda: fx.postfix_dsn(ANN, MID, VERP, status="5.2.2", diagnostic="smtp; 552 5.2.2 mailbox full"),
            "dsn",
            BounceKind.SOFT,
            "5.2.2",
        ),
        (
            lambda: fx.postfix_dsn(ANN, MID, VERP, status="5.1.8", diagnostic="smtp; 553 5.1.8 bad sender"),
            "dsn",
            BounceKind.POLICY,
            "5.1.8",
        ),
        (lambda: fx.exchange_ndr(ANN, MID, VERP), "dsn", BounceKind.HARD, "5.1.10"),
        (lambda: fx.exchange_ndr(ANN, MID, VERP, status="5.7.1"), "dsn", BounceKind.POLICY, "5.7.1"),
        (lambda: fx.gmail_dsn(ANN, MID, VERP), "dsn", BounceKind.HARD, "5.1.1"),
        (lambda: fx.gmail_dsn(ANN, MID, VERP, status="5.7.26"), "dsn", BounceKind.POLICY, "5.7.26"),
        # Yahoo says 5.0.0 and gives the reason as a bare 554 text: its "dd This user
        # doesn't have a yahoo.com account" is "no such mailbox" by is_hard_bounce's rule.
        (lambda: fx.yahoo_dsn(ANN, MID, VERP), "dsn", BounceKind.HARD, "5.0.0"),
        (lambda: fx.yahoo_dsn(ANN, MID, VERP).replace(b"Status: 5.0.0\n", b""), "dsn", BounceKind.HARD, None),
        (
            lambda: fx.yahoo_dsn(ANN, MID, VERP).replace(b"account (", b"account, blocked as spam ("),
            "dsn",
            BounceKind.POLICY,
            "5.0.0",
        ),
        (lambda: fx.outlook_jmrp(ANN, MID, VERP), "arf", BounceKind.COMPLAINT, None),
        (lambda: fx.qmail_bounce(ANN, MID, VERP), "heuristic", BounceKind.HARD, "5.1.1"),
    ],
)
def test_provider_formats_are_read_and_classified(build, fmt: str, kind: BounceKind, status: str | None) -> None:
    report = parse_report(build())
    assert report is not None
    assert report.format == fmt
    assert [(r.address, r.kind, r.status) for r in report.recipients] == [(ANN, kind, status)]
    assert report.ref.startswith("<") and report.ref.endswith(">")
    if fmt != "heuristic":
        assert MID in report.original_message_ids
    assert VERP in report.envelope_addresses


def test_dsn_prefers_original_recipient_and_reads_several_recipients() -> None:
    raw = fx.postfix_dsn(ANN, MID, VERP).replace(
        b"Original-Recipient: rfc822;ann@example.org",
        b"Original-Recipient: rfc822;Ann@Example.org",
    )
    raw = raw.replace(
        b"Diagnostic-Code:",
        b"Diagnostic-Code: smtp; 550 5.1.1 no\n\nFinal-Recipient: rfc822; bob@example.org\nAction: delayed\n"
        b"Status: 4.4.7\n\nFinal-Recipient: rfc822; cy@example.org\nAction: delivered\nStatus: 2.0.0\nX-Was:",
        1,
    )
    report = parse_report(raw)
    assert report is not None
    assert [(r.address, r.kind) for r in report.recipients] == [
        ("Ann@Example.org", BounceKind.HARD),
        ("bob@example.org", BounceKind.SOFT),
    ]


def test_yahoo_arf_with_redacted_recipient_keeps_the_message_id() -> None:
    report = parse_report(fx.yahoo_arf(MID, VERP))
    assert report is not None and report.format == "arf" and report.feedback_type == "abuse"
    assert [r.kind for r in report.recipients] == [BounceKind.COMPLAINT]
    assert report.original_message_ids == (MID,)


def test_arf_original_rcpt_to_wins_and_not_spam_is_no_complaint() -> None:
    raw = fx.yahoo_arf(MID, VERP).replace(b"Version: 0.1\n", b"Version: 1\nOriginal-Rcpt-To: <carol@example.net>\n")
    report = parse_report(raw)
    assert report is not None and [r.address for r in report.recipients] == ["carol@example.net"]
    not_spam = parse_report(raw.replace(b"Feedback-Type: abuse", b"Feedback-Type: not-spam"))
    assert not_spam is not None and not_spam.recipients == ()


def test_report_without_message_id_is_referenced_by_its_bytes() -> None:
    raw = fx.postfix_dsn(ANN, MID, VERP).replace(b"Message-Id: <2026", b"X-Old-Id: <2026")
    report = parse_report(raw)
    assert report is not None and report.ref.startswith("sha256:")
    assert parse_report(raw).ref == report.ref  # type: ignore[union-attr]


def test_heuristic_drops_addresses_of_the_quoted_original_sender() -> None:
    raw = fx.qmail_bounce(ANN, MID, VERP).replace(
        b"<ann@example.org>:\n", b"<ann@example.org>:\n<news@acme.example>:\n"
    )
    report = parse_report(raw)
    assert report is not None
    assert [r.address for r in report.recipients] == [ANN]


def test_foreign_mail_is_none_and_broken_report_is_an_error() -> None:
    assert parse_report(fx.human_reply(MID)) is None
    assert parse_report(b"") is None
    with pytest.raises(ReportError):
        parse_report(fx.broken_report())


def test_deeply_nested_multipart_is_bounded() -> None:
    depth = 5000
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n) for n in range(depth))
    raw = b"From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail\nMIME-Version: 1.0\n" + head + b"\nx\n"
    try:
        result = parse_report(raw)
    except ReportError:
        return
    assert result is None or result.format in ("dsn", "arf", "heuristic")


_FIXTURES = [
    fx.postfix_dsn(ANN, MID, VERP),
    fx.exchange_ndr(ANN, MID, VERP),
    fx.gmail_dsn(ANN, MID, VERP),
    fx.yahoo_arf(MID, VERP),
    fx.outlook_jmrp(ANN, MID, VERP),
    fx.qmail_bounce(ANN, MID, VERP),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(_FIXTURES) - 1),
    cut=st.integers(0, 10_000),
    splice=st.binary(max_size=200),
    at=st.integers(0, 10_000),
)
def test_mutated_reports_never_crash(index: int, cut: int, splice: bytes, at: int) -> None:
    base = _FIXTURES[index]
    raw = base[: at % (len(base) + 1)] + splice + base[at % (len(base) + 1) :]
    raw = raw[: max(cut, 1) * 3] if cut % 2 else raw
    try:
        report = parse_report(raw)
    except ReportError:
        return
    if report is not None:
        assert report.ref
        for recipient in report.recipients:
            assert recipient.kind in BounceKind
            assert recipient.address is None or "@" in recipient.address


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        parse_report(b"Content-Type: multipart/report; boundary=x\n\n--x\n" + raw)
        parse_report(raw)
    except ReportError:
        pass
