"""``mailer report --html FILE``: one self-contained page with charts.

The page is meant to be mailed around or opened from disk years later, so it holds
everything itself: CSS in a ``<style>`` element, charts as inline SVG drawn here, no
script, font, image or link to anything outside the file (a ``Content-Security-Policy``
meta element says so to the browser too). Every value that came from outside —
addresses, domains, SMTP replies, link targets — is hostile input and goes through
:func:`html.escape` (with quotes), in text and in attributes alike.

Accessibility: each chart is an ``<svg role="img">`` with a ``<title>`` and a
``<desc>``, is labelled by its heading, and is followed by a table with the same
numbers (screen readers and copy-paste read the table; the colours are not the only
carrier of meaning, every bar has its number written beside it).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..core.addresses import display_domain
from ..core.errors import UsageError
from ..store.records import Report, TimeCount
from .engagement import Engagement

__all__ = ["render_report_html", "write_report_html"]

# Over this many hours the sends-over-time chart counts per day instead.
_MAX_HOUR_BUCKETS = 72
_TOP_DOMAINS = 15
_TOP_REPLIES = 10

_STATUS_COLOURS = {
    "sent": "#2e7d32",
    "failed": "#c62828",
    "deferred": "#ef6c00",
    "invalid": "#6a1b9a",
    "suppressed": "#546e7a",
    "sending": "#f9a825",
}

_CSS = """
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #fff; --muted: #5f6368; --grid: #ddd; }
@media (prefers-color-scheme: dark) { :root { --fg: #eee; --bg: #151515; --muted: #aaa; --grid: #444; } }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1rem; max-width: 60rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; padding: 0; list-style: none; }
.cards li { border: 1px solid var(--grid); border-radius: .4rem; padding: .5rem .8rem; min-width: 7rem; }
.cards b { display: block; font-size: 1.3rem; }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--fg); font-size: 12px; }
svg .axis { stroke: var(--grid); }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border-bottom: 1px solid var(--grid); padding: .2rem .6rem; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.reply { word-break: break-word; max-width: 36rem; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: -.05em; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .8rem; font-size: .9rem; }
.muted { color: var(--muted); }
"""


def _e(value: object) -> str:
    """``value`` as text safe in an element's content and in a quoted attribute."""
    return html.escape(str(value), quote=True)


# --- charts ---------------------------------------------------------------------------


def _column_chart(chart_id: str, title: str, buckets: Sequence[tuple[str, int]]) -> str:
    """Vertical bars over time (label under the first, middle and last bar)."""
    width, height, left, bottom, top = 720, 220, 44, 30, 12
    peak = max((count for _, count in buckets), default=0) or 1
    plot_w, plot_h = width - left - 8, height - bottom - top
    step = plot_w / max(len(buckets), 1)
    bar_w = max(step * 0.8, 1.0)
    parts = [
        f'<svg id="{chart_id}" role="img" aria-labelledby="{chart_id}-t {chart_id}-d" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-t">{_e(title)}</title>',
        f'<desc id="{chart_id}-d">{len(buckets)} bars; the highest is {peak}. '
        "The same numbers are in the table below.</desc>",
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    label_at = {0, len(buckets) // 2, len(buckets) - 1}
    for index, (label, count) in enumerate(buckets):
        bar_h = plot_h * count / peak
        x = left + index * step + (step - bar_w) / 2
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" '
            f'fill="#1565c0"><title>{_e(label)}: {count}</title></rect>'
        )
        if index in label_at:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 10}" text-anchor="middle">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _stacked_bar_chart(
    chart_id: str, title: str, rows: Sequence[tuple[str, dict[str, int]]], colours: dict[str, str] | None = None
) -> str:
    """One horizontal bar per row, stacked by status, with the total written at its end."""
    row_h, left, right, width = 24, 190, 60, 720
    height = row_h * len(rows) + 10
    peak = max((sum(parts.values()) for _, parts in rows), default=0) or 1
    plot_w = width - left - right
    parts = [
        f'<svg id="{chart_id}" role="img" aria-labelledby="{chart_id}-t {chart_id}-d" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-t">{_e(title)}</title>',
        f'<desc id="{chart_id}-d">{len(rows)} bars, one per row of the table below, split by status.</desc>',
    ]
    for index, (label, counts) in enumerate(rows):
        y = 5 + index * row_h
        shown = label if len(label) <= 28 else label[:27] + "…"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{_e(shown)}</text>')
        x = float(left)
        for status, count in counts.items():
            bar_w = plot_w * count / peak
            colour = (colours or _STATUS_COLOURS).get(status, "#888")
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 3}" width="{bar_w:.1f}" height="{row_h - 8}" fill="{colour}">'
                f"<title>{_e(label)}: {_e(status + ' ' if status else '')}{count}</title></rect>"
            )
            x += bar_w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{sum(counts.values())}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(chart_id: str, title: str, rows: Sequence[tuple[str, int]], colour: str = "#1565c0") -> str:
    return _stacked_bar_chart(chart_id, title, [(label, {"": count}) for label, count in rows], {"": colour})


def _legend(statuses: Sequence[str]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{_STATUS_COLOURS.get(s, "#888")}"></span>{_e(s)}</li>'
        for s in statuses
    )
    return f'<ul class="legend" aria-hidden="true">{items}</ul>'


def _table(caption: str, header: Sequence[str], rows: Sequence[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            css = ' class="n"' if index in numeric else (' class="reply"' if header[index] == "reply" else "")
            cells.append(f"<td{css}>{_e(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><caption class=muted>{_e(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --- the page -------------------------------------------------------------------------


def _time_buckets(hours: Sequence[TimeCount]) -> tuple[str, list[tuple[str, int]]]:
    """Hourly counts, or per day when they span three days or more; empty hours or days
    in between are shown as zero, so the axis is time."""
    if not hours:
        return "hour", []
    counts = {h.start: h.sent for h in hours}
    first = datetime.fromisoformat(hours[0].start + ":00").replace(tzinfo=UTC)
    last = datetime.fromisoformat(hours[-1].start + ":00").replace(tzinfo=UTC)
    if (last - first) < timedelta(hours=_MAX_HOUR_BUCKETS):
        steps = int((last - first) / timedelta(hours=1))
        stamps = [(first + timedelta(hours=n)).strftime("%Y-%m-%dT%H") for n in range(steps + 1)]
        return "hour (UTC)", [(stamp.replace("T", " ") + ":00", counts.get(stamp, 0)) for stamp in stamps]
    days: dict[str, int] = {}
    for h in hours:
        days[h.start[:10]] = days.get(h.start[:10], 0) + h.sent
    span = (last.date() - first.date()).days
    stamps = [(first.date() + timedelta(days=n)).isoformat() for n in range(span + 1)]
    return "day (UTC)", [(stamp, days.get(stamp, 0)) for stamp in stamps]


def _section(title: str, section_id: str, body: str) -> str:
    return f'<section aria-labelledby="{section_id}"><h2 id="{section_id}">{_e(title)}</h2>{body}</section>'


def _engagement_section(engagement: Engagement) -> str:
    """The engagement part: bounces, complaints, unsubscribes, opens, clicks per link."""
    cards = [
        ("unique opens", engagement.unique_opens),
        ("unique clicks", engagement.unique_clicks),
        ("hard bounces", engagement.bounces_hard),
        ("soft bounces", engagement.bounces_soft),
        ("complaints", engagement.complaints),
        ("complaint rate", f"{engagement.complaint_rate * 100:.2f} %"),
        ("unsubscribes", engagement.unsubscribes),
    ]
    body = [
        '<ul class="cards">' + "".join(f"<li>{_e(name)}<b>{_e(value)}</b></li>" for name, value in cards) + "</ul>",
        '<p class="muted">Opens are inflated: Apple Mail Privacy Protection loads every image of a '
        "message when it arrives, read or not; treat unique opens as an upper bound, clicks as the signal.</p>",
        f"<p>Complaint rate {engagement.complaint_rate * 100:.2f} % of {engagement.sent} sent: "
        f"<b>{_e(engagement.complaint_level)}</b> (warn above 0.1 %, fail above 0.3 %: Gmail's limits).</p>",
    ]
    links = list(engagement.clicks_by_link)
    if links:
        rows = [(link.url, link.unique_clicks) for link in links[:_TOP_REPLIES]]
        body.append(_bar_chart("chart-links", "Unique clicks per link", rows))
        body.append(
            _table(
                "click-through per link",
                ["link", "unique clicks", "click-through"],
                [(link.url, link.unique_clicks, f"{link.click_through * 100:.2f} %") for link in links],
                {1, 2},
            )
        )
    return _section("Engagement", "engagement", "".join(body))


def render_report_html(
    report: Report, *, engagement: Engagement | None = None, generated_at: datetime | None = None
) -> str:
    """The whole page for ``report`` as one string."""
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    title = f"mailer report: {report.campaign}" if report.campaign else "mailer report: all campaigns"
    sent = report.by_status.get("sent", 0)
    cards = "".join(
        f"<li>{_e(status)}<b>{count}</b></li>"
        for status, count in [("recipients", report.total), *report.by_status.items()]
    )
    sections = [f'<ul class="cards" aria-label="recipients by status">{cards}</ul>']

    unit, buckets = _time_buckets(report.sends_over_time)
    if buckets:
        chart = _column_chart("chart-time", f"Messages sent per {unit}", buckets)
        table = _table(f"messages sent per {unit}", [unit, "sent"], buckets, {1})
        sections.append(_section("Sends over time", "time", chart + table))
    else:
        sections.append(_section("Sends over time", "time", "<p>Nothing was sent.</p>"))

    if report.by_domain:
        top = report.by_domain[:_TOP_DOMAINS]
        statuses = [s for s in _STATUS_COLOURS if any(s in d.by_status for d in top)]
        rows = [(display_domain(d.domain) or "(no domain)", d.by_status) for d in top]
        chart = _stacked_bar_chart("chart-domains", "Outcomes by recipient domain", rows)
        table = _table(
            "outcomes by recipient domain",
            ["domain", "total", *statuses],
            [(label, sum(c.values()), *(c.get(s, 0) for s in statuses)) for label, c in rows],
            set(range(1, len(statuses) + 2)),
        )
        more = len(report.by_domain) - len(top)
        note = f'<p class="muted">and {more} more domains.</p>' if more > 0 else ""
        sections.append(_section("Outcomes by domain", "domains", _legend(statuses) + chart + table + note))

    if report.by_smtp_code:
        top_replies = report.by_smtp_code[:_TOP_REPLIES]
        rows_r = [("-" if r.code is None else str(r.code), r.count) for r in top_replies]
        chart = _bar_chart("chart-replies", "The most frequent SMTP replies", rows_r, "#455a64")
        table = _table(
            "the most frequent SMTP replies (or reasons, without a reply)",
            ["code", "recipients", "reply"],
            [("-" if r.code is None else r.code, r.count, r.example_reply or "") for r in top_replies],
            {1},
        )
        sections.append(_section("Top SMTP replies", "replies", chart + table))

    if engagement is not None:
        sections.append(_engagement_section(engagement))

    if report.unknown_outcome:
        rows_u = [(d.recipient, d.message_id or "") for d in report.unknown_outcome[:100]]
        sections.append(
            _section(
                "Unknown outcome",
                "unknown",
                f"<p>{len(report.unknown_outcome)} recipients have status <code>sending</code>: the process stopped "
                "during their SMTP transaction. They are not resent unless you pass --resend-unknown.</p>"
                + _table("recipients with an unknown outcome", ["recipient", "Message-ID"], rows_u, set()),
            )
        )

    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class=muted>{sent} of {report.total} recipients sent; "
        f"generated {_e(when)} from the send log.</p></header><main>" + "".join(sections) + "</main></body></html>\n"
    )


def write_report_html(report: Report, path: Path, *, engagement: Engagement | None = None) -> None:
    """Write the page to ``path`` (whole or not at all: a temporary file is renamed)."""
    text = render_report_html(report, engagement=engagement)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write the HTML report ({exc.strerror}).", path=str(path)) from None
