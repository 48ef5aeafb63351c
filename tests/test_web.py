"""`mailer serve` over real HTTP: a real `mailer serve` process on a free loopback port
for unsubscribes (one-click as Gmail and Yahoo send it, the page, forged tokens), and the
app under a real uvicorn server in a thread for the tracking routes."""

from __future__ import annotations

import quopri
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from send_support import Project, received_addresses
from web_support import app_server, serving

from mailer.core.tokens import TokenKind, TokenSigner
from mailer.store.sqlite import SendLog
from mailer.web.app import PIXEL_GIF, create_app

SECRET = "w" * 43
ENV = {"MAILER_WEB_SECRET": SECRET}


def request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None):
    """(status, headers, body) of one request; redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Project, str]]:
    project = Project(tmp_path)
    project.configure(web={"base_url": "https://mail.acme.example"})
    with SendLog.open(project.log_path):
        pass
    with serving(project, ENV, timeout=20) as base:
        yield project, base


def suppressed(project: Project, address: str) -> bool:
    with SendLog.open(project.log_path, create=False) as log:
        return log.suppressed([address])[0]


def test_one_click_post_as_mail_providers_send_it_unsubscribes(served) -> None:
    project, base = served
    token = TokenSigner(SECRET).unsubscribe_token("spring", "Jane@Example.com")
    status, headers, body = request(
        f"{base}/u/{token}",
        method="POST",
        body=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Google-Unsubscribe"},
    )
    assert status == 200, body
    assert suppressed(project, "jane@example.com")
    with SendLog.open(project.log_path, create=False) as log:
        ((campaign, recipient, kind, _at, _detail, source),) = log.list_feedback("spring")
        (suppression,) = list(log.list_suppressions())
    assert (campaign, recipient, kind, source) == ("spring", "jane@example.com", "unsubscribed", "web")
    assert (suppression.reason, suppression.source) == ("unsubscribe", "web")
    assert b"jane" not in body.lower() and b"example" not in body.lower()
    # Yahoo sends it as multipart/form-data; a second unsubscribe is fine too.
    boundary = "xYzZy"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--{boundary}--\r\n'
    ).encode()
    status, _, _ = request(
        f"{base}/u/{token}",
        method="POST",
        body=multipart,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200


def test_the_page_has_one_button_and_a_get_never_unsubscribes(served) -> None:
    project, base = served
    token = TokenSigner(SECRET).unsubscribe_token("spring", "jane@example.com")
    status, headers, body = request(f"{base}/u/{token}")
    assert status == 200
    page = body.decode()
    assert page.count("<button") == 1 and '<form method="post">' in page
    assert "<script" not in page and 'name="viewport"' in page and 'lang="en"' in page
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert "server" not in {name.lower() for name in headers}
    request(f"{base}/u/{token}", method="HEAD")
    assert not suppressed(project, "jane@example.com")
    assert request(f"{base}/healthz")[2] == b"ok"


def test_forged_altered_and_other_kinds_of_tokens_get_the_same_404_and_change_nothing(served) -> None:
    project, base = served
    good = TokenSigner(SECRET).unsubscribe_token("spring", "jane@example.com")
    flipped = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    cases = [
        TokenSigner("f" * 43).unsubscribe_token("spring", "jane@example.com"),
        flipped,
        good[:-3],
        TokenSigner(SECRET).open_token("spring", "jane@example.com"),
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "jane@example.com",
    ]
    bodies = set()
    for token in cases:
        for method in ("GET", "POST"):
            status, headers, body = request(
                f"{base}/u/{token}", method=method, body=b"List-Unsubscribe=One-Click" if method == "POST" else None
            )
            assert status == 404, (token, method)
            assert b"script" not in body and b"jane" not in body
            bodies.add(body)
    assert len(bodies) == 1
    # Tracking is off in this config: the pixel and the redirect do not exist.
    signer = TokenSigner(SECRET)
    assert request(f"{base}/o/{signer.open_token('spring', 'jane@example.com')}")[0] == 404
    assert request(f"{base}/c/{signer.click_token('spring', 'jane@example.com', 'https://shop.example/')}")[0] == 404
    assert request(f"{base}/nothing/here")[0] == 404
    assert not suppressed(project, "jane@example.com")
    with SendLog.open(project.log_path, create=False) as log:
        assert log.list_feedback() == []


def test_serve_without_the_key_exits_2_naming_the_variable(tmp_path: Path) -> None:
    project = Project(tmp_path)
    project.configure(web={"base_url": "https://mail.acme.example", "secret_env": "ACME_WEB_KEY"})
    outcome = project.run("serve", "--listen", "127.0.0.1:0", env={"ACME_WEB_KEY": ""})
    assert outcome.exit_code == 2, outcome
    assert "ACME_WEB_KEY" in outcome.stderr and "Traceback" not in outcome.stderr
    project.configure(web=None)
    outcome = project.run("serve", env=ENV)
    assert outcome.exit_code == 2 and "[web]" in outcome.stderr, outcome
    project.configure(web={"base_url": "http://mail.acme.example"})
    outcome = project.run("serve", "--listen", "nonsense", env=ENV)
    assert outcome.exit_code == 2 and "--listen" in outcome.stderr, outcome


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[tuple[SendLog, str]]:
    log = SendLog.open(tmp_path / "log.sqlite3")
    app = create_app(log, TokenSigner(SECRET), opens=True, clicks=True)
    try:
        with app_server(app) as base:
            yield log, base
    finally:
        log.close()


def test_the_pixel_and_the_click_redirect_record_events(tracking_server) -> None:
    log, base = tracking_server
    signer = TokenSigner(SECRET)
    status, headers, body = request(f"{base}/o/{signer.open_token('spring', 'jane@example.com')}")
    assert (status, headers["content-type"], body) == (200, "image/gif", PIXEL_GIF)
    target = "https://shop.example/sale?item=1&utm_source=news"
    status, headers, _ = request(f"{base}/c/{signer.click_token('spring', 'jane@example.com', target)}")
    assert (status, headers["location"]) == (302, target)
    kinds = [(kind, detail) for _c, _r, kind, _a, detail, _s in log.list_feedback("spring")]
    assert kinds == [("opened", None), ("clicked", target)]
    # An altered click token (another target spliced in) and a signed non-web URL go nowhere.
    forged = signer.click_token("spring", "jane@example.com", "https://evil.example/")
    good = signer.click_token("spring", "jane@example.com", target)
    assert request(f"{base}/c/{good[:40]}{forged[40:]}")[0] == 404
    assert request(f"{base}/c/{signer.click_token('spring', 'j@x.example', 'javascript:alert(1)')}")[0] == 404
    assert request(f"{base}/c/{good}?url=https://evil.example/")[1]["location"] == target
    # An unsubscribe token is not a pixel.
    assert request(f"{base}/o/{signer.unsubscribe_token('spring', 'jane@example.com')}")[0] == 404
    assert len(log.list_feedback()) == 3


def test_plain_http_base_url_warns_except_on_loopback() -> None:
    from mailer.web.serve import base_url_warning

    assert base_url_warning("https://mail.acme.example") is None
    assert base_url_warning(None) is None
    assert base_url_warning("http://127.0.0.1:8025") is None
    assert base_url_warning("http://localhost:8025") is None
    assert base_url_warning("http://[::1]:8025") is None
    warning = base_url_warning("http://mail.acme.example")
    assert warning is not None and "RFC 8058" in warning and "https://" in warning


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-send"])
@pytest.mark.parametrize(
    ("base_url", "warns"),
    [("http://mail.acme.example", True), ("http://127.0.0.1:8025", False), ("https://mail.acme.example", False)],
    ids=["plain-http", "loopback", "https"],
)
def test_send_warns_once_on_stderr_for_a_plain_http_base_url(
    tmp_path: Path, smtp_server, base_url: str, warns: bool, dry_run: bool
) -> None:
    project = Project(tmp_path, smtp_server)
    project.configure(web={"base_url": base_url}, message={"kind": "marketing"})
    project.write_contacts(["jane@example.com", "joe@example.com"])
    outcome = project.send("--dry-run" if dry_run else "--yes", "--campaign", "spring", env=ENV)
    assert outcome.exit_code == 0, outcome
    if dry_run:
        assert outcome.stdout.count("List-Unsubscribe: <") == 2, outcome
    else:
        assert sorted(received_addresses(smtp_server)) == ["jane@example.com", "joe@example.com"]
    warning = f"warning: [web] base_url {base_url} is plain HTTP"
    assert outcome.stderr.count(warning) == (1 if warns else 0), outcome
    assert outcome.stderr.count("RFC 8058") == (1 if warns else 0), outcome
    # stdout is the product (the dry run's mbox): never a warning in it.
    assert "plain HTTP" not in outcome.stdout and "warning:" not in outcome.stdout, outcome


def test_a_marketing_send_with_web_gets_a_signed_one_click_unsubscribe(tmp_path: Path) -> None:
    project = Project(tmp_path)
    project.configure(
        web={"base_url": "https://mail.acme.example"},
        message={"kind": "marketing", "list_unsubscribe_mailto": "unsub@acme.example"},
    )
    project.write_contacts(["jane@example.com"])
    project.write_template("Subject: News\n\nHello {{ name }}, leave: {{ unsubscribe_url }}\n")
    outcome = project.send("--dry-run", "--campaign", "spring", env=ENV)
    assert outcome.exit_code == 0, outcome
    found = re.search(
        r"List-Unsubscribe: <mailto:unsub@acme.example\?subject=unsubscribe>,\s+<(https://[^>]+)>", outcome.stdout
    )
    assert found, outcome.stdout
    url = found.group(1)
    assert url.startswith("https://mail.acme.example/u/")
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in outcome.stdout
    assert f"leave: {url}" in quopri.decodestring(outcome.stdout.encode()).decode()  # the body is quoted-printable
    assert "jane" not in url
    claims = TokenSigner(SECRET).verify(url.rsplit("/", 1)[1], TokenKind.UNSUBSCRIBE)
    assert claims is not None and (claims.campaign, claims.address) == ("spring", "jane@example.com")
    # Without the key the send is refused before anything is built, naming the variable.
    outcome = project.send("--dry-run", env={"MAILER_WEB_SECRET": ""})
    assert outcome.exit_code == 2 and "MAILER_WEB_SECRET" in outcome.stderr, outcome


def test_a_store_that_cannot_be_written_gets_a_503_page_that_reveals_nothing(tmp_path: Path) -> None:
    # A real store that fails: the log is closed under the running app (as when its file or
    # server went away), so every write raises; the app must answer 503, never 200.
    log = SendLog.open(tmp_path / "log.sqlite3")
    errors: list[BaseException] = []
    app = create_app(log, TokenSigner(SECRET), opens=True, on_error=errors.append)
    with app_server(app) as base:
        log.close()
        token = TokenSigner(SECRET).unsubscribe_token("spring", "jane@example.com")
        status, headers, body = request(f"{base}/u/{token}", method="POST", body=b"List-Unsubscribe=One-Click")
        assert status == 503, body
        assert b"try again" in body and b"jane" not in body.lower() and b"example" not in body.lower()
        assert b"sqlite" not in body.lower() and b"Error" not in body and b"Traceback" not in body
        assert headers["content-type"].startswith("text/html")
        assert len(errors) == 1
        status, _, body = request(f"{base}/o/{TokenSigner(SECRET).open_token('spring', 'jane@example.com')}")
        assert status == 503 and b"jane" not in body.lower()
        # The page still loads (it writes nothing), and the health check answers.
        assert request(f"{base}/u/{token}")[0] == 200
        assert request(f"{base}/healthz")[0] == 200
    with SendLog.open(tmp_path / "log.sqlite3", create=False) as reopened:
        assert reopened.suppressed(["jane@example.com"]) == [False]
        assert reopened.list_feedback() == []
