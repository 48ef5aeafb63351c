"""[relays.NAME], [streams.NAME], [direct] and [direct.domains."X"]: parsed into frozen
dataclasses, every bad key an exit 2 naming the file and the key (mailer.core.streams)."""

from __future__ import annotations

import dataclasses

import pytest
from cli_fixtures import assert_fails

from mailer.core.config import DirectConfig, load_config, parse_duration
from mailer.core.errors import ConfigError

CONTACTS = "email,name\nann@example.com,Ann\n"
RULE = '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1h"\n'
TEMPLATE = "From: a@acme.example\nSubject: Hi {{ name }}\n\nHello\n"

FULL = """\
[smtp]
host = "127.0.0.1"
port = 2525
security = "none"

[relays.ses]
host = "email-smtp.eu-west-1.amazonaws.com"
username = "AKIAEXAMPLE"
password_env = "SES_SMTP_PASSWORD"
weight = 3
rate = "14/s"
connections = 8

[relays.backup]
host = "smtp.backup.example"
port = 465
security = "tls"
helo = "relay-helo.acme.example"

[streams.marketing]
relays = ["ses", "backup"]
source_addresses = ["192.0.2.10", "2001:db8::11"]
helo = "mta1.acme.example"
return_path = "bounces+{token}@acme.example"

[streams.transactional]
direct = true
source_addresses = ["192.0.2.20"]

[streams.plain]

[direct]
port = 2526
tls = "required"
queue_lifetime = "36h"
connections_per_domain = 2
rate_per_domain = "5/s"

[direct.domains."gmail.com"]
connections = 10
rate = "20/s"

[direct.domains."Outlook.COM."]
rate = "600/min"
"""


def test_the_full_example_parses_into_frozen_dataclasses(project):
    project.config(FULL)
    config = load_config("mailer.toml")
    ses, backup = config.relays
    assert (ses.name, ses.smtp.host, ses.smtp.username, ses.smtp.password_env) == (
        "ses",
        "email-smtp.eu-west-1.amazonaws.com",
        "AKIAEXAMPLE",
        "SES_SMTP_PASSWORD",
    )
    assert (ses.weight, ses.rate_per_second, ses.connections) == (3.0, 14.0, 8)
    assert (ses.smtp.security, ses.smtp.effective_port) == ("starttls", 587)  # [smtp]'s defaults
    assert (backup.weight, backup.rate_per_second, backup.connections) == (1.0, None, None)
    assert (backup.smtp.effective_port, backup.smtp.security, backup.smtp.helo) == (
        465,
        "tls",
        "relay-helo.acme.example",
    )
    marketing = config.stream("marketing")
    assert marketing is not None
    assert marketing.relays == ("ses", "backup") and not marketing.direct
    assert marketing.source_addresses == ("192.0.2.10", "2001:db8::11")
    assert (marketing.helo, marketing.return_path, marketing.verp) == (
        "mta1.acme.example",
        "bounces+{token}@acme.example",
        True,
    )
    transactional = config.stream("transactional")
    assert transactional is not None and transactional.direct and transactional.source_addresses == ("192.0.2.20",)
    plain = config.stream("plain")
    assert plain is not None and plain.uses_smtp_section and not plain.verp
    direct = config.direct
    assert (direct.port, direct.tls, direct.queue_lifetime_seconds) == (2526, "required", 36 * 3600)
    assert (direct.connections_per_domain, direct.rate_per_domain_per_second) == (2, 5.0)
    gmail, outlook = direct.domains
    assert (gmail.name, gmail.connections, gmail.rate_per_second) == ("gmail.com", 10, 20.0)
    assert (outlook.name, outlook.connections, outlook.rate_per_second) == ("outlook.com", None, 10.0)
    assert direct.domain("GMAIL.com.") is gmail and direct.domain("yahoo.com") is None
    for frozen in (ses, marketing, direct, gmail):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.name = "x"  # type: ignore[misc]


def test_without_the_new_sections_nothing_changes(project):
    project.config('[smtp]\nhost = "relay.example"\n')
    config = load_config("mailer.toml")
    assert config.relays == () and config.streams == ()
    assert config.direct == DirectConfig()
    assert (config.direct.port, config.direct.tls, config.direct.queue_lifetime_seconds) == (25, "mta-sts", 5 * 86400)
    assert config.direct.rate_per_domain_per_second is None and config.direct.connections_per_domain == 4


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("5d", 432000), ("1.5h", 5400), (" 2 D ", 172800)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5w", "0s", "-1d", "366d", "d", "1e3s", "5 days", ""])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("toml", "key", "what"),
    [
        # [relays.NAME]
        ("[relays.ses]\nport = 587\n", "relays.ses.host", "required"),
        ('[relays.ses]\nhost = "a.example"\nhots = 1\n', "relays.ses.hots", "unknown key"),
        ('[relays.ses]\nhost = "a.example:587"\n', "relays.ses.host", "without a port"),
        ('[relays.ses]\nhost = "a.example"\nport = 0\n', "relays.ses.port", "between 1 and 65535"),
        ('[relays.ses]\nhost = "a.example"\nsecurity = "ssl"\n', "relays.ses.security", '"starttls"'),
        ('[relays.ses]\nhost = "a.example"\nweight = 0\n', "relays.ses.weight", "more than 0"),
        ('[relays.ses]\nhost = "a.example"\nweight = "3"\n', "relays.ses.weight", "must be a number"),
        ('[relays.ses]\nhost = "a.example"\nrate = "fast"\n', "relays.ses.rate", "not a rate"),
        ('[relays.ses]\nhost = "a.example"\nconnections = 0\n', "relays.ses.connections", "from 1 to"),
        ('[relays.ses]\nhost = "a.example"\ntimeout = 0\n', "relays.ses.timeout", "more than 0"),
        ('[relays.ses]\nhost = "a.example"\nhelo = "bad name!"\n', "relays.ses.helo", "domain name"),
        ('[relays.ses]\nhost = "a.example"\npassword_env = "my-pass"\n', "relays.ses.password_env", "NAME"),
        ('[relays."bad name"]\nhost = "a.example"\n', "relays.bad name", "not a usable relay name"),
        ('[relays.smtp]\nhost = "a.example"\n', "relays.smtp", "reserved"),
        ("[relays]\nses = 3\n", "relays.ses", "must be a [relays.NAME] table"),
        # [streams.NAME]
        ('[streams.m]\nrelays = ["nope"]\n', "streams.m.relays", "'nope', which is not defined"),
        ('[relays.a]\nhost = "a.example"\n[streams.m]\nrelays = ["a", "a"]\n', "streams.m.relays", "twice"),
        ("[streams.m]\nrelays = []\n", "streams.m.relays", "is empty"),
        ("[streams.m]\nrelays = [1]\n", "streams.m.relays", "relay names"),
        ('[relays.a]\nhost = "a.example"\n[streams.m]\nrelays = ["a"]\ndirect = true\n', "streams.m.direct", "relays"),
        ('[streams.m]\ndirect = "yes"\n', "streams.m.direct", "true or false"),
        ('[streams.m]\nsource_addresses = ["192.0.2.300"]\n', "streams.m.source_addresses", "local IP addresses"),
        ('[streams.m]\nsource_addresses = ["mta1.example"]\n', "streams.m.source_addresses", "local IP"),
        ('[streams.m]\nsource_addresses = ["192.0.2.1", "192.0.2.1"]\n', "streams.m.source_addresses", "twice"),
        ('[streams.m]\nsource_addresses = "192.0.2.1"\n', "streams.m.source_addresses", "must be a list"),
        ('[streams.m]\nhelo = "-bad-"\n', "streams.m.helo", "domain name"),
        ('[streams.m]\nhelo = "mta1.example"\nehlo = "x"\n', "streams.m.ehlo", "unknown key"),
        ('[streams.m]\nreturn_path = "bounces"\n', "streams.m.return_path", "an address"),
        ('[streams.m]\nreturn_path = "b@{token}.example"\n', "streams.m.return_path", "before the @"),
        ('[streams.m]\nreturn_path = "b+{token}{token}@x.example"\n', "streams.m.return_path", "once"),
        ('[streams.m]\nreturn_path = "b+{tok}@x.example"\n', "streams.m.return_path", "only placeholder"),
        ('[streams.m]\nreturn_path = "b ounce@x.example"\n', "streams.m.return_path", "character"),
        ('[streams.m]\nreturn_path = "b..x@x.example"\n', "streams.m.return_path", "dot"),
        ('[streams.m]\nreturn_path = "b@x_.example!"\n', "streams.m.return_path", "domain"),
        (f'[streams.m]\nreturn_path = "{"b" * 40}+{{token}}@x.example"\n', "streams.m.return_path", "at most 64"),
        ('[streams."m m"]\n', "streams.m m", "not a usable stream name"),
        # [direct]
        ("[direct]\nport = 70000\n", "direct.port", "between 1 and 65535"),
        ('[direct]\ntls = "dane"\n', "direct.tls", '"mta-sts"'),
        ('[direct]\nqueue_lifetime = "5 days"\n', "direct.queue_lifetime", "not a duration"),
        ("[direct]\nqueue_lifetime = 5\n", "direct.queue_lifetime", "must be a string"),
        ("[direct]\nconnections_per_domain = 0\n", "direct.connections_per_domain", "from 1 to"),
        ('[direct]\nrate_per_domain = "10"\n', "direct.rate_per_domain", "not a rate"),
        ("[direct]\nretries = 3\n", "direct.retries", "unknown key"),
        ('[direct.domains."gmail.com"]\nconnections = 0\n', 'direct.domains."gmail.com".connections', "from 1 to"),
        ('[direct.domains."gmail.com"]\nrate = "x"\n', 'direct.domains."gmail.com".rate', "not a rate"),
        ('[direct.domains."gmail.com"]\nburst = 3\n', 'direct.domains."gmail.com".burst', "unknown key"),
        ('[direct.domains."not a domain"]\nrate = "1/s"\n', 'direct.domains."not a domain"', "not a domain"),
        (
            '[direct.domains."gmail.com"]\nrate = "1/s"\n[direct.domains."GMAIL.COM."]\nrate = "2/s"\n',
            'direct.domains."GMAIL.COM."',
            "same destination",
        ),
        ('[direct.domains]\n"gmail.com" = 3\n', 'direct.domains."gmail.com"', "must be a table"),
        # [[direct.rules]]
        ('[[direct.rules]]\naction = "suspend"\nduration = "1h"\n', "direct.rules[1].match", "is missing"),
        (RULE + '[[direct.rules]]\nmatch = "x"\naction = "suspend"\n', "direct.rules[2].duration", "is missing"),
        (
            '[[direct.rules]]\nmatch = "(unclosed"\naction = "suspend"\nduration = "1h"\n',
            "direct.rules[1].match",
            "not a regular expression",
        ),
        ('[[direct.rules]]\nmatch = ""\naction = "suspend"\nduration = "1h"\n', "direct.rules[1].match", "1 to 500"),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "bounce"\nduration = "1h"\n',
            "direct.rules[1].action",
            '"suspend" or "throttle"',
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1 hour"\n',
            "direct.rules[1].duration",
            "not a duration",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1h"\nrate = "1/s"\n',
            "direct.rules[1]",
            "throttle rules only",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "throttle"\nduration = "1h"\nrate = "fast"\n',
            "direct.rules[1].rate",
            "not a rate",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "throttle"\nduration = "1h"\nconnections = 0\n',
            "direct.rules[1].connections",
            "from 1 to",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "often"\n',
            "direct.rules[1].trigger",
            "not a trigger",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "0/h"\n',
            "direct.rules[1].trigger",
            "at least one",
        ),
        (
            '[[direct.rules]]\nmatch = "x"\naction = "suspend"\nduration = "1h"\nwhen = "now"\n',
            "direct.rules[1].when",
            "unknown key",
        ),
        ('[direct]\nrules = ["x"]\n', "direct.rules[1]", "[[direct.rules]]"),
    ],
)
def test_bad_stream_config_names_the_file_and_the_key(project, run_cli, toml, key, what):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    project.config(toml)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mailer.toml", key, what)
    assert result.stdout == ""
    with pytest.raises(ConfigError) as caught:
        load_config("mailer.toml")
    assert caught.value.path == "mailer.toml"
    assert caught.value.key == key


def test_config_reply_rules_come_before_the_built_in_ones_with_their_triggers(project):
    from mailer.delivery.shaping import REPLY_RULES, reply_rules

    project.config(
        "[[direct.rules]]\n"
        'match = "421 .*please slow down"\naction = "throttle"\nduration = "30m"\nconnections = 2\n'
        'rate = "60/min"\ntrigger = "3/h"\n'
        "[[direct.rules]]\n"
        'match = "554 5.7.1 .*blocked"\naction = "suspend"\nduration = "2h"\n'
    )
    config = load_config("mailer.toml")
    slow, blocked = config.direct.rules
    assert (slow.action, slow.duration_seconds, slow.connections, slow.rate_per_second) == ("throttle", 1800, 2, 1.0)
    assert slow.trigger_count_and_period == (3, 3600.0)
    assert (blocked.action, blocked.duration_seconds, blocked.trigger_count_and_period) == ("suspend", 7200, (1, 0.0))
    rules = reply_rules(config.direct)
    assert rules[2:] == REPLY_RULES
    assert (rules[0].pattern, rules[0].threshold, rules[0].period, rules[0].rate) == (slow.match, 3, 3600.0, 1.0)
    assert "#2" in rules[1].source and rules[1].threshold == 1
    assert reply_rules(load_config_text(project, "")) == REPLY_RULES


def load_config_text(project, text: str):
    project.config(text)
    return load_config("mailer.toml").direct


def test_a_password_pasted_into_a_relay_password_env_is_not_shown(project, run_cli):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    project.config('[relays.ses]\nhost = "a.example"\npassword_env = "Tr0ub4dor3"\n')
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "relays.ses.password_env")
    assert "Tr0ub4dor3" not in result.output


def test_internationalized_destination_names_are_kept_as_idna(project):
    project.config('[direct.domains."bücher.example"]\nrate = "1/s"\n[direct.domains.".google.com"]\nrate = "2/s"\n')
    names = [entry.name for entry in load_config("mailer.toml").direct.domains]
    assert names == ["xn--bcher-kva.example", "google.com"]
