"""The destinations and ETA of a send (mailer.send.estimate): pure arithmetic, then the
dry-run summary and the confirmation prompt that show it."""

from __future__ import annotations

import importlib
import json
import tomllib
from collections import Counter

import pytest
from send_support import Project

from mailer.core.config import parse_config
from mailer.delivery.routes import select_route
from mailer.send.estimate import estimate_send, format_duration, format_rate, route_rate


def config_of(text: str):
    return parse_config(tomllib.loads(text), path=None)


STREAMS = """\
[send]
rate = "100/s"

[relays.a]
host = "a.example"
weight = 3
rate = "15/s"

[relays.b]
host = "b.example"

[relays.slow]
host = "s.example"
rate = "2/s"

[streams.marketing]
relays = ["a", "b"]

[streams.mixed]
relays = ["a", "slow"]

[streams.open]
relays = ["b"]

[streams.mx]
direct = true

[direct]
rate_per_domain = "5/s"

[direct.domains."gmail.com"]
rate = "20/s"
"""


def test_a_relay_with_its_own_rate_caps_the_stream_at_rate_over_share():
    config = config_of(STREAMS)
    # a takes 3/4 of the messages at 15/s: the stream goes at 20/s; b has no limit.
    assert route_rate(select_route(config, "marketing"), campaign_rate=100.0) == pytest.approx(20.0)
    # a: 15 / (3/4) = 20; slow: 2 / (1/4) = 8, the tighter one.
    assert route_rate(select_route(config, "mixed"), campaign_rate=100.0) == pytest.approx(8.0)
    assert route_rate(select_route(config, "open"), campaign_rate=100.0) == 100.0
    assert route_rate(select_route(config, "open"), campaign_rate=0.0) is None  # unlimited


def test_top_domains_and_eta():
    config = config_of(STREAMS)
    domains = Counter({"gmail.com": 8000, "yahoo.com": 4000, "outlook.com": 3000, "a.example": 3000, "b.example": 2000})
    estimate = estimate_send(domains, route=select_route(config, "marketing"), config=config, top=3)
    assert (estimate.messages, estimate.others, estimate.other_domains) == (20000, 5000, 2)
    assert estimate.seconds == pytest.approx(1000.0)  # 20,000 at 20/s
    assert estimate.describe() == (
        "40 % gmail.com (8,000), 20 % yahoo.com (4,000), 15 % outlook.com (3,000), "
        "2 other domains (5,000); ETA 17 min at 20/s"
    )
    assert estimate.to_dict()["top_domains"][0] == {"domain": "gmail.com", "messages": 8000}


def test_direct_streams_wait_for_their_slowest_destination():
    config = config_of(STREAMS)
    domains = Counter({"gmail.com": 2000, "small.example": 1000})
    estimate = estimate_send(domains, route=select_route(config, "mx"), config=config)
    # 3,000 at 100/s is 30 s, but small.example takes 1,000 at 5/s: 200 s.
    assert estimate.seconds == pytest.approx(200.0)


def test_without_limits_no_eta_is_made_up():
    config = config_of('[send]\nrate = "unlimited"\n')
    estimate = estimate_send(Counter({"x.example": 5}), route=select_route(config), config=config)
    assert estimate.seconds is None and "no rate limit configured" in estimate.describe()


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.2, "1 s"), (45, "45 s"), (360, "6 min"), (9000, "2.5 h"), (3 * 86400, "3.0 days")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("rate", "text"), [(20, "20/s"), (2.5, "2.5/s"), (0.5, "30/min"), (1 / 360, "10/h")])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_the_dry_run_summary_shows_destinations_and_eta(tmp_path, smtp_server):
    project = Project(tmp_path, smtp_server)
    project.configure(send={"rate": "10/s"})
    emails = [f"u{n}@gmail.com" for n in range(6)] + [f"v{n}@yahoo.com" for n in range(3)] + ["w@other.example"]
    project.write_contacts(emails)
    outcome = project.send("--dry-run")
    assert outcome.exit_code == 0, outcome
    assert "destinations 60 % gmail.com (6), 30 % yahoo.com (3), 10 % other.example (1); ETA 1 s at 10/s" in (
        outcome.stderr
    )
    out = tmp_path / "out"
    outcome = project.send("--dry-run", "--output", str(out), "--json")
    estimate = json.loads(outcome.stdout)["estimate"]
    assert estimate["messages"] == 10 and estimate["rate_per_second"] == 10.0 and estimate["eta_seconds"] == 1.0


def test_the_prompt_shows_destinations_and_eta(tmp_path, smtp_server, monkeypatch):
    cli = importlib.import_module("mailer.cli.app")
    project = Project(tmp_path, smtp_server)
    project.configure(send={"rate": "600/min"})
    project.write_contacts([f"u{n}@gmail.com" for n in range(4)] + ["x@yahoo.com"])
    asked: list[str] = []
    monkeypatch.setattr(cli, "_confirmation", lambda reporter: lambda question: asked.append(question) or False)
    outcome = project.send()
    assert outcome.exit_code == 2
    assert asked[0].startswith("Destinations: 80 % gmail.com (4), 20 % yahoo.com (1); ETA 1 s at 10/s.\n")
    assert "Send campaign 'news' to 5 recipients" in asked[0]
    assert smtp_server.connections == 0
