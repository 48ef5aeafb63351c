"""[tracking] at build time: the HTML transform alone, and through a real dry run."""

from __future__ import annotations

import email
import email.policy
import re
from html import unescape

from send_support import Project

from mailer.compose.tracking import Tracker
from mailer.core.tokens import TokenKind, TokenSigner

SECRET = "k" * 40
BASE = "https://mail.acme.example"


def tracker(**options) -> Tracker:
    values = {"opens": True, "clicks": True, "utm": {"utm_source": "newsletter", "utm_campaign": "spring"}}
    values.update(options)
    return Tracker(signer=TokenSigner(SECRET), base_url=BASE, campaign="spring", **values)


def hrefs(html: str) -> list[str]:
    return [unescape(m) for m in re.findall(r'href="([^"]*)"', html)]


def target_of(url: str) -> str:
    assert url.startswith(BASE + "/c/"), url
    claims = TokenSigner(SECRET).verify(url.removeprefix(BASE + "/c/"), TokenKind.CLICK)
    assert claims is not None and claims.campaign == "spring" and claims.address == "ann@example.com"
    assert claims.url is not None
    return claims.url


def test_links_become_signed_redirects_with_utm_and_the_pixel_ends_the_body():
    html = (
        "<html><body><p><a href='https://acme.example/a?x=1&amp;utm_source=own#part'>A</a> "
        '<a class="b" href="http://acme.example/b">B</a> <A HREF=https://acme.example/c>C</A> '
        '<a href="mailto:hi@acme.example">mail</a> <a href="#top">top</a> '
        '<a href="https://acme.example/unsub/1">unsubscribe</a></p></body></html>'
    )

    result = tracker().apply(html, "ann@example.com", unsubscribe_url="https://acme.example/unsub/1")

    links = hrefs(result.replace("HREF=", "href="))
    assert target_of(links[0]) == "https://acme.example/a?x=1&utm_source=own&utm_campaign=spring#part"
    assert target_of(links[1]) == "http://acme.example/b?utm_source=newsletter&utm_campaign=spring"
    assert target_of(links[2]) == "https://acme.example/c?utm_source=newsletter&utm_campaign=spring"
    assert links[3:] == ["mailto:hi@acme.example", "#top", "https://acme.example/unsub/1"]
    assert 'class="b"' in result and ">C</A>" in result
    pixel = re.findall(r'<img src="([^"]+)" width="1" height="1" alt=""', result)
    assert len(pixel) == 1 and result.index(pixel[0]) > result.index("unsubscribe")
    assert result.endswith("</body></html>")
    claims = TokenSigner(SECRET).verify(pixel[0].removeprefix(BASE + "/o/"), TokenKind.OPEN)
    assert claims is not None and claims.address == "ann@example.com"


def test_only_utm_leaves_links_readable_and_adds_no_pixel():
    result = tracker(opens=False, clicks=False).apply('<a href="https://acme.example/?">x</a>', "ann@example.com")

    assert hrefs(result) == ["https://acme.example/?utm_source=newsletter&utm_campaign=spring"]
    assert "<img" not in result
    assert tracker(opens=False, clicks=False, utm={}).apply("<a href='https://x.example'>", "a@b.c") == (
        "<a href='https://x.example'>"
    )


def test_pixel_without_a_body_element_goes_at_the_end():
    result = tracker(clicks=False, utm={}).apply("<p>hello</p>", "ann@example.com")
    assert result.startswith("<p>hello</p><img src=")


def test_dry_run_tracks_the_html_part_only_and_csv_values_add_no_link(tmp_path):
    project = Project(
        tmp_path,
        web={"base_url": BASE},
        tracking={"opens": True, "clicks": True, "utm": {"utm_campaign": "{{ campaign }}", "utm_medium": "email"}},
    )
    (tmp_path / "contacts.csv").write_text(
        'email,name,site\nann@example.com,Ann,"<a href=""https://evil.example/"">win</a> https://evil.example/x"\n',
        encoding="utf-8",
    )
    project.write_template(
        "Subject: News\n\nHello {{ name }}, read [the news](https://acme.example/news?id=7) "
        "or [write to us](mailto:hi@acme.example). {{ site }}\n",
        name="news.md.j2",
    )
    out = tmp_path / "out"

    outcome = project.send("--dry-run", "--campaign", "spring", "--output", str(out), env={"MAILER_WEB_SECRET": SECRET})

    assert outcome.exit_code == 0, outcome
    messages = [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default) for path in sorted(out.glob("*.eml"))
    ]
    assert len(messages) == 1
    html = messages[0].get_body(preferencelist=("html",)).get_content()
    text = messages[0].get_body(preferencelist=("plain",)).get_content()
    links = hrefs(html)
    assert target_of(links[0]) == "https://acme.example/news?id=7&utm_campaign=spring&utm_medium=email"
    assert links[1:] == ["mailto:hi@acme.example"]  # the CSV value's <a> is text, not a link
    assert "&lt;a href=" in html and "evil.example" not in "".join(links)
    assert html.count(f"{BASE}/o/") == 1
    assert "https://acme.example/news?id=7" in text and BASE not in text  # the text part keeps the readable URL


def test_tracking_without_base_url_or_key_is_exit_2(tmp_path):
    project = Project(tmp_path, tracking={"clicks": True})
    project.write_contacts(["ann@example.com"])
    outcome = project.send("--dry-run", "--output", str(tmp_path / "o.mbox"))
    assert outcome.exit_code == 2
    assert "tracking.clicks" in outcome.stderr and "base_url" in outcome.stderr

    project = Project(tmp_path, web={"base_url": BASE}, tracking={"opens": True})
    outcome = project.send("--dry-run", "--output", str(tmp_path / "o.mbox"), env={"MAILER_WEB_SECRET": None})
    assert outcome.exit_code == 2 and "MAILER_WEB_SECRET" in outcome.stderr
    assert not (tmp_path / "o.mbox").exists()

    project = Project(tmp_path, tracking={"utm": {"utm_x": "{{ campaign"}})
    outcome = project.send("--dry-run", "--output", str(tmp_path / "o.mbox"))
    assert outcome.exit_code == 2 and "tracking.utm.utm_x" in outcome.stderr
