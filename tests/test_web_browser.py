"""`mailer serve` in a real browser: Debian's headless chromium, driven by selenium through
Debian's chromedriver, against a real `mailer serve` process on a free loopback port whose
send log and token come from a real dry run (the URL is the one in List-Unsubscribe).

Skipped, with the reason, only where chromium or chromedriver is not installed or cannot
start (CI installs both: .ci/run)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from send_support import Project
from web_support import chromium_flags, serving

from mailer.core.tokens import TokenKind, TokenSigner
from mailer.store.sqlite import SendLog

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SECRET = "b" * 43
ENV = {"MAILER_WEB_SECRET": SECRET}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def start_browser(profile: Path, *, width: int, height: int, phone: bool = False) -> webdriver.Chrome:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    # Both paths given: selenium's driver manager is never asked to look anything up.
    options.binary_location = CHROMIUM
    for flag in chromium_flags(profile, f"--window-size={width},{height}"):
        options.add_argument(flag)
    if phone:
        # A headless window is at least 500 px wide; a phone's viewport (and its meta
        # viewport handling) comes from chromium's device emulation instead.
        options.add_experimental_option(
            "mobileEmulation", {"deviceMetrics": {"width": width, "height": height, "pixelRatio": 3.0, "touch": True}}
        )
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except WebDriverException as error:
        pytest.skip(f"headless chromium could not start here: {error.msg}")
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def unsubscribe_url(tmp_path: Path) -> Iterator[tuple[Project, str]]:
    """(project, the page's URL on a running `mailer serve`) for jane@example.com."""
    project = Project(tmp_path)
    project.configure(web={"base_url": "http://127.0.0.1:8025"}, message={"kind": "marketing"})
    project.write_contacts(["Jane@Example.com"])
    project.write_template("Subject: News\n\nHello {{ name }}, leave here: {{ unsubscribe_url }}\n")
    dry_run = project.run("send", str(project.contacts_path), str(project.template_path), "--dry-run",
                          "--campaign", "spring", env=ENV)  # fmt: skip
    assert dry_run.exit_code == 0, dry_run
    found = re.search(r"List-Unsubscribe: <(http://127\.0\.0\.1:8025/u/[^>]+)>", dry_run.stdout)
    assert found, dry_run.stdout
    token = found.group(1).rsplit("/", 1)[1]
    claims = TokenSigner(SECRET).verify(token, TokenKind.UNSUBSCRIBE)
    assert claims is not None and claims.campaign == "spring"
    with SendLog.open(project.log_path):
        pass
    with serving(project, ENV) as base:
        yield project, f"{base}/u/{token}"


def suppression_of(project: Project, address: str):
    with SendLog.open(project.log_path, create=False) as log:
        return [entry for entry in log.list_suppressions() if entry.address.casefold() == address.casefold()]


def test_the_unsubscribe_page_in_chromium_has_one_labelled_button_that_unsubscribes(
    unsubscribe_url, tmp_path: Path
) -> None:
    project, url = unsubscribe_url
    driver = start_browser(tmp_path / "profile", width=1280, height=900)
    try:
        driver.get(url)
        assert driver.title == "Unsubscribe"
        buttons = driver.find_elements(By.TAG_NAME, "button")
        assert len(buttons) == 1
        button = buttons[0]
        # The accessible name a screen reader announces (computed by chromium, not read from the HTML).
        assert button.accessible_name == "Unsubscribe" and button.aria_role == "button"
        assert button.is_displayed() and button.is_enabled()
        assert driver.find_elements(By.TAG_NAME, "script") == []
        assert driver.execute_script("return document.scripts.length") == 0
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
        assert "jane" not in driver.page_source.lower()
        # Loading the page (a GET) unsubscribed nobody.
        assert suppression_of(project, "jane@example.com") == []

        button.click()
        WebDriverWait(driver, 30).until(lambda d: d.title == "You are unsubscribed")
        assert "You will not receive these emails any more." in driver.find_element(By.TAG_NAME, "main").text
        assert driver.current_url == url  # the form posts back to the same URL
        (entry,) = suppression_of(project, "jane@example.com")
        assert (entry.reason, entry.source) == ("unsubscribe", "web")
        with SendLog.open(project.log_path, create=False) as log:
            kinds = [(campaign, kind) for campaign, _r, kind, _a, _d, _s in log.list_feedback()]
        assert kinds == [("spring", "unsubscribed")]
    finally:
        driver.quit()


def test_the_unsubscribe_page_fits_a_phone_screen(unsubscribe_url, tmp_path: Path) -> None:
    project, url = unsubscribe_url
    driver = start_browser(tmp_path / "profile", width=360, height=740, phone=True)
    try:
        driver.get(url)
        inner_width = driver.execute_script("return window.innerWidth")
        assert 300 <= inner_width <= 400, inner_width  # the window really is phone-sized
        assert driver.execute_script("return document.documentElement.scrollWidth") <= inner_width
        assert driver.execute_script("return document.body.scrollWidth") <= inner_width
        button = driver.find_element(By.TAG_NAME, "button")
        rect = button.rect
        assert rect["x"] >= 0 and rect["x"] + rect["width"] <= inner_width
        assert rect["height"] >= 44  # a thumb-sized target
        assert suppression_of(project, "jane@example.com") == []
    finally:
        driver.quit()
