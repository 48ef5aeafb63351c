"""`mailer report --html FILE`: the page parsed back, its contents, no external reference, hostile values escaped."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from send_support import Project
from web_support import chromium_flags

from mailer.report import render_report_html
from mailer.store.records import DomainCount, ReplyCount, Report, TimeCount

HOSTILE = '<script>alert("x")</script><img src=https://evil.example/p.gif>'


class Page(HTMLParser):
    """Every start tag with its attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.svg_titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        if len(self.stack) >= 2 and self.stack[-1] == "title" and self.stack[-2] == "svg":
            self.svg_titles.append(data)

    def all_text(self) -> str:
        return "".join(self.text)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def assert_self_contained(page: Page) -> None:
    names = {tag for tag, _ in page.tags}
    assert not names & {"script", "img", "link", "iframe", "object", "embed", "image", "use", "a", "form"}
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert name not in {"src", "href", "xlink:href", "action"}, (tag, name)
            if name == "style" and value:
                assert "url(" not in value
    # The only namespace-looking URL allowed is the SVG namespace in xmlns.
    assert {attrs.get("xmlns") for tag, attrs in page.tags if tag == "svg"} <= {"http://www.w3.org/2000/svg"}


def test_report_html_from_a_real_send(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@example.com", "al@example.com", "ben@example.org", "bo@example.org", "not-an-address"])
    smtp_server.set_fault("al@example.com", "data", f"552 5.2.2 {HOSTILE}")
    smtp_server.set_fault("bo@example.org", "rcpt", "451 4.3.0 mailbox busy")
    assert project.send("--yes").exit_code == 1
    page_path = tmp_path / "report.html"

    outcome = project.cli("report", "--campaign", "news", "--html", str(page_path))

    assert outcome.exit_code == 0, outcome
    assert f"wrote the HTML report to {page_path}" in outcome.stderr
    assert "campaign news: 5 recipients" in outcome.stdout  # the tables are still printed
    raw = page_path.read_text(encoding="utf-8")
    assert "<script" not in raw and "evil.example/p.gif>" not in raw
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in raw
    page = parse(raw)
    assert_self_contained(page)
    text = page.all_text()
    assert HOSTILE in text  # shown as text, whole
    assert "mailer report: news" in text
    for heading in ("Sends over time", "Outcomes by domain", "Top SMTP replies"):
        assert heading in text
    assert "example.com" in text and "example.org" in text
    # Every chart has a title and a table with its numbers behind it.
    svgs = [attrs for tag, attrs in page.tags if tag == "svg"]
    assert len(svgs) == 3 and all(attrs.get("role") == "img" and attrs.get("aria-labelledby") for attrs in svgs)
    assert page.svg_titles == [
        "Messages sent per hour (UTC)",
        "Outcomes by recipient domain",
        "The most frequent SMTP replies",
    ]
    assert sum(1 for tag, _ in page.tags if tag == "table") == 3
    hour = datetime.now(UTC).strftime("%Y-%m-%d %H:00")
    assert hour in text or (hour[:-5] in text)  # two sent in the hour of the run


def test_report_html_unwritable_path_is_a_clear_error(smtp_server, tmp_path):
    project = Project(tmp_path, smtp_server)
    project.write_contacts(["ann@example.com"])
    assert project.send("--yes").exit_code == 0
    target = tmp_path / "missing-folder" / "report.html"

    outcome = project.cli("report", "--html", str(target))

    assert outcome.exit_code == 2
    assert "cannot write the HTML report" in outcome.stderr and str(target) in outcome.stderr
    assert not target.exists() and not list((tmp_path).glob(".report.html.tmp"))


def hostile_report() -> Report:
    hours = [TimeCount(start=f"2026-11-{day:02d}T{hour:02d}", sent=day * hour) for day in (1, 2, 5) for hour in (3, 9)]
    return Report(
        campaign=HOSTILE,
        total=10,
        by_status={"sent": 6, "failed": 2, "deferred": 0, "invalid": 1, "suppressed": 1, "sending": 0},
        by_domain=[
            DomainCount(domain=f'"><svg onload=alert(1)>{HOSTILE}', total=3, by_status={"sent": 2, "failed": 1})
        ],
        by_smtp_code=[ReplyCount(code=None, count=2, example_reply="]]></title><script>1</script>")],
        sends_over_time=hours,
    )


def test_hostile_values_are_text_and_days_replace_hours_over_three_days():
    raw = render_report_html(hostile_report(), generated_at=datetime(2026, 12, 1, tzinfo=UTC))

    page = parse(raw)
    assert_self_contained(page)
    assert "<svg onload" not in raw and "<script" not in raw
    assert f'"><svg onload=alert(1)>{HOSTILE}' in page.all_text()
    assert "]]></title><script>1</script>" in page.all_text()
    assert page.svg_titles[0] == "Messages sent per day (UTC)"
    assert "2026-11-05" in page.all_text() and "2026-11-05 03:00" not in page.all_text()
    assert "2026-11-0412" not in page.all_text() and "2026-11-040" in page.all_text()  # an empty day is a zero


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_page_renders_in_headless_chromium(tmp_path: Path):
    page_path = tmp_path / "report.html"
    page_path.write_text(render_report_html(hostile_report()), encoding="utf-8")
    png = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            *chromium_flags(tmp_path / "profile", f"--screenshot={png}", "--window-size=900,1400"),
            page_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
