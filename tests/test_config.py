"""mailer.toml: where it is found, what is refused (naming file and key), CLI overrides."""

from __future__ import annotations

import time

import pytest
from cli_fixtures import assert_fails, dry_run

from mailer.cli.starter import STARTER_CONFIG
from mailer.core.config import Config, load_config, parse_rate, write_config
from mailer.core.errors import ConfigError

CONTACTS = "email,name\nann@example.com,Ann\n"
# No From: in the template, so each message shows which config file was read.
TEMPLATE = "Subject: Hi {{ name }}\n\nHello\n"


def config_with_sender(sender: str, extra: str = "") -> str:
    return f'[message]\nfrom = "{sender}"\n{extra}'


def sender_of(project, run_cli, *args: str) -> str:
    result, summary, messages = dry_run(project, run_cli, *args)
    assert result.exit_code == 0, result.stderr
    return messages[0]["From"].addresses[0].addr_spec


# --- where the config is found ----------------------------------------------------------------


def test_config_is_found_by_flag_then_environment_then_working_directory(project, run_cli, monkeypatch):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    project.config(config_with_sender("cwd@acme.example"))
    project.config(config_with_sender("env@acme.example"), name="env/env.toml")
    project.config(config_with_sender("flag@acme.example"), name="flag/flag.toml")

    assert sender_of(project, run_cli) == "cwd@acme.example"
    monkeypatch.setenv("MAILER_CONFIG", str(project.path("env/env.toml")))
    assert sender_of(project, run_cli) == "env@acme.example"
    assert sender_of(project, run_cli, "--config", "flag/flag.toml") == "flag@acme.example"
    assert sender_of(project, run_cli, "-c", str(project.path("flag/flag.toml"))) == "flag@acme.example"


def test_the_default_file_is_read_from_the_working_directory(project, run_cli, monkeypatch):
    project.csv(CONTACTS)
    project.template(TEMPLATE)
    project.config(config_with_sender("here@acme.example"), name="sub/mailer.toml")
    monkeypatch.chdir(project.path("sub"))
    result, summary, messages = dry_run(project, run_cli, contacts="../contacts.csv", template="../mail.txt.j2")
    assert result.exit_code == 0, result.stderr
    assert messages[0]["From"].addresses[0].addr_spec == "here@acme.example"


def test_no_config_file_is_fine_when_the_template_says_enough(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    assert load_config(None) == Config()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_explicit_config_that_does_not_exist_is_an_error(project, run_cli, monkeypatch, how):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    args = ["--config", "missing.toml"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("MAILER_CONFIG", "missing.toml")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", *args)
    assert_fails(result, 2, "missing.toml", "config file not found", "mailer init")


# --- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, key, what",
    [
        ('[smtpp]\nhost = "x"\n', "[smtpp]", "unknown section"),
        ('[smtp]\nhots = "x"\n', "smtp.hots", "unknown key"),
        ('[send]\nconnections = "4"\n', "send.connections", "must be an integer"),
        ("[send]\nconnections = true\n", "send.connections", "must be an integer"),
        ('[smtp]\ntimeout = "30"\n', "smtp.timeout", "must be a number"),
        ("[smtp]\nport = 99999\n", "smtp.port", "between 1 and 65535"),
        ("[smtp]\ndata_timeout = 0\n", "smtp.data_timeout", "more than zero seconds"),
        ("[smtp]\ndata_timeout = nan\n", "smtp.data_timeout", "at most 86400"),
        ('[smtp]\nsecurity = "ssl"\n', "smtp.security", '"starttls", "tls" or "none"'),
        ('[send]\nrate = "fast"\n', "send.rate", "N/s, N/min"),
        ("[send]\nconnections = 0\n", "send.connections", "at least 1"),
        ("[send]\nretries = -1\n", "send.retries", "0 or more"),
        ('[message]\nlist_unsubscribe = "http://acme.example/u"\n', "message.list_unsubscribe", "https://"),
        ('[message]\nkind = "spam"\n', "message.kind", "marketing"),
        ('[dkim]\ndomain = "acme.example"\n', "dkim.selector", "required"),
        ("[dns]\nnameservers = [1, 2]\n", "dns.nameservers", "IP address strings"),
        ("smtp = 3\n", "smtp", "[section] table"),
    ],
)
def test_bad_config_names_the_file_and_the_key(project, run_cli, toml, key, what):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config(toml)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mailer.toml", key, what)
    assert result.stdout == ""
    with pytest.raises(ConfigError) as caught:
        load_config("mailer.toml")
    assert caught.value.path == "mailer.toml"
    assert caught.value.key == key.strip("[]")


def test_invalid_toml_names_the_file_and_line(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config('[smtp]\nhost = "x"\nport = \n')
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mailer.toml", "not valid TOML", "line 3")


def test_config_not_utf8(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config('[message]\nfrom = "Caf\xe9 <a@acme.example>"\n'.encode("latin-1"))
    assert_fails(run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run"), 2, "mailer.toml", "UTF-8")


@pytest.mark.parametrize("password", ["hunter2!", "correct horse battery staple", "Tr0ub4dor3", "p@ss-w0rd"])
def test_a_password_in_password_env_is_refused_and_not_shown(project, run_cli, password):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config(f'[smtp]\npassword_env = "{password}"\n')
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "mailer.toml", "smtp.password_env", "NAME of an environment variable")
    assert password not in result.output


def test_a_password_of_the_wrong_type_is_not_shown(project, run_cli):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config("[smtp]\npassword_env = 90210417\n")
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run")
    assert_fails(result, 2, "smtp.password_env", "must be a string")
    assert "90210417" not in result.output


@pytest.mark.parametrize("name", ["MAILER_SMTP_PASSWORD", "smtp_password", "SES_PASS2", "_X"])
def test_variable_names_are_accepted_and_read_from_the_environment(tmp_path, monkeypatch, name):
    path = tmp_path / "mailer.toml"
    path.write_text(f'[smtp]\npassword_env = "{name}"\n', encoding="utf-8")
    monkeypatch.setenv(name, "s3cret")
    config = load_config(path)
    assert config.smtp.password_env == name
    assert config.smtp.password() == "s3cret"
    assert "s3cret" not in repr(config)


def test_paths_are_relative_to_the_config_file(tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "mailer.toml"
    path.write_text(
        '[log]\npath = "logs/send.sqlite3"\n[dkim]\ndomain = "acme.example"\nselector = "s1"\nprivate_key = "k.pem"\n',
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.log.path == folder / "logs/send.sqlite3"
    assert config.dkim is not None and config.dkim.private_key == folder / "k.pem"


def test_a_full_config_loads_into_frozen_dataclasses(tmp_path):
    path = tmp_path / "mailer.toml"
    write_config(path, STARTER_CONFIG | {"dns": {"nameservers": ["127.0.0.1"], "port": 5353}})
    config = load_config(path)
    assert config.path == path
    assert (config.smtp.host, config.smtp.effective_port, config.smtp.security) == ("smtp.example.com", 587, "starttls")
    assert (config.send.rate_per_second, config.send.connections, config.send.retries) == (10.0, 4, 3)
    assert config.message.from_ == "Example News <news@example.com>"
    assert config.dns.nameservers == ("127.0.0.1",) and config.dns.port == 5353
    with pytest.raises(AttributeError):
        config.send.connections = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, per_second",
    [
        ("10/s", 10.0),
        ("600/min", 10.0),
        ("5000/h", 5000 / 3600),
        ("86400/day", 1.0),
        ("2.5/sec", 2.5),
        (" 7 / M ", 7 / 60),
        ("unlimited", 0.0),
    ],
)
def test_parse_rate(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["10", "ten/s", "10/week", "0/s", "-1/s", "10/"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError, match=r"rate|more than zero"):
        parse_rate(text)


# --- CLI flags override the file ---------------------------------------------------------------


def test_cli_rate_and_connections_override_the_file(tmp_path):
    path = tmp_path / "mailer.toml"
    path.write_text('[send]\nrate = "1/min"\nconnections = 4\nretries = 5\n', encoding="utf-8")
    config = load_config(path).replace_send(rate="100/s", connections=1)
    assert config.send.rate_per_second == 100.0
    assert config.send.connections == 1
    assert config.send.retries == 5  # untouched


@pytest.mark.parametrize(
    "args, what",
    [
        (["--rate", "fast"], "--rate"),
        (["--rate", "0/s"], "--rate"),
        (["--rate", "1" * 400 + "/s"], "--rate"),
        (["--rate", "0.0000001/day"], "--rate"),
        (["--connections", "0"], "--connections"),
        (["--connections", "100000"], "--connections"),
    ],
)
def test_bad_cli_overrides_are_refused(project, run_cli, args, what):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config()
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", *args)
    assert_fails(result, 2, what)
    assert result.stdout == ""


def test_cli_flags_win_over_the_file_in_a_real_send(project, run_cli, smtp_server):
    """The file says 1 message a minute over 4 connections; the flags say 100/s over 1."""
    project.csv("email,name\n" + "".join(f"user{i}@example.com,U{i}\n" for i in range(4)))
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config(
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_server.port}\nsecurity = "none"\n'
        '[send]\nrate = "1/min"\nconnections = 4\n[log]\npath = "send.sqlite3"\n'
    )
    started = time.monotonic()
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--yes", "--rate", "100/s", "--connections", "1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert len(smtp_server.messages) == 4
    assert smtp_server.connections == 1  # --connections 1, not the file's 4
    assert elapsed < 30  # at the file's 1/min, four messages take three minutes


# --- numbers and names are checked when the config loads -----------------------------------


@pytest.mark.parametrize(
    "toml, key, what",
    [
        ("[send]\nretry_backoff = inf\n", "send.retry_backoff", "from 0 to 3600 seconds"),
        ("[send]\nretry_backoff = nan\n", "send.retry_backoff", "from 0 to 3600 seconds"),
        ("[send]\nretry_backoff = 1e9\n", "send.retry_backoff", "from 0 to 3600 seconds"),
        ("[smtp]\ntimeout = inf\n", "smtp.timeout", "more than 0 to 3600 seconds"),
        ("[smtp]\ntimeout = nan\n", "smtp.timeout", "more than 0 to 3600 seconds"),
        ("[smtp]\ntimeout = 0\n", "smtp.timeout", "more than 0 to 3600 seconds"),
        ("[send]\nconnections = 100000\n", "send.connections", "from 1 to 1,000"),
        ("[send]\nconnections = 9223372036854775807\n", "send.connections", "from 1 to 1,000"),
        ("[send]\nmax_per_connection = 9223372036854775807\n", "send.max_per_connection", "from 1 to"),
        ("[send]\nretries = 1000000\n", "send.retries", "from 0 to 100"),
        (f'[send]\nrate = "{"9" * 400}/s"\n', "send.rate", "1/day to 100000/s"),
        ('[send]\nrate = "0.0000001/day"\n', "send.rate", "1/day to 100000/s"),
        ("[send]\nrender_timeout = 0\n", "send.render_timeout", "more than 0 to 3600 seconds"),
        ("[send]\nrender_timeout = inf\n", "send.render_timeout", "more than 0 to 3600 seconds"),
        ("[send]\nrender_max_bytes = 10\n", "send.render_max_bytes", "from 1000 to"),
        ('[smtp]\nhost = ""\n', "smtp.host", "host name or an IP address"),
        ('[smtp]\nhost = "127.0.0.1:25"\n', "smtp.host", "without a port"),
        ('[smtp]\nhost = "smtp.acme.example:587"\n', "smtp.host", "without a port"),
        ('[smtp]\nhost = "smtp acme"\n', "smtp.host", "host name or an IP address"),
        ('[smtp]\nhelo = "mta1.acme.example\\r\\nMAIL FROM:<x@y>"\n', "smtp.helo", "domain name"),
        ('[smtp]\nhelo = "mta1\\n"\n', "smtp.helo", "domain name"),
        ("[dns]\nport = 0\n", "dns.port", "between 1 and 65535"),
        ("[dns]\ntimeout = nan\n", "dns.timeout", "more than 0 to 300 seconds"),
    ],
)
def test_config_numbers_and_names_out_of_range_are_refused_at_load(project, run_cli, toml, key, what):
    test_bad_config_names_the_file_and_the_key(project, run_cli, toml, key, what)


@pytest.mark.parametrize(
    "toml",
    [
        '[smtp]\nhost = "localhost."\nhelo = "[192.0.2.1]"\n',
        '[smtp]\nhost = "::1"\nhelo = "mta1.acme.example"\n',
        '[smtp]\nhost = "smtp_relay.internal"\ntimeout = 0.5\n',
        '[send]\nrate = "1/day"\nretry_backoff = 0\nconnections = 1000\nrender_timeout = 0.5\nrender_max_bytes = 1000\n',
        '[send]\nrate = "100000/s"\n',
    ],
)
def test_config_values_at_the_edges_are_accepted(tmp_path, toml):
    path = tmp_path / "mailer.toml"
    path.write_text(toml, encoding="utf-8")
    load_config(path)


@pytest.mark.parametrize(
    "toml, key, what",
    [
        ('[message]\nreply_to = "a@acme.example\\nBcc: e@evil.example"\n', "message.reply_to", "line break"),
        ('[message]\nfrom = "a@acme.example\\r\\nBcc: e@evil.example"\n', "message.from", "line break"),
        ('[message]\nfeedback_id = "a\\nb"\n', "message.feedback_id", "line break"),
        ('[log]\npath = "mailer\\u0000.sqlite3"\n', "log.path", "NUL"),
        ('[send]\nrate = "0"\n', "send.rate", "unlimited"),
        ('[send]\nrate = "none"\n', "send.rate", "unlimited"),
    ],
)
def test_values_that_would_mean_something_else_are_refused(project, run_cli, toml, key, what):
    test_bad_config_names_the_file_and_the_key(project, run_cli, toml, key, what)


@pytest.mark.parametrize("args", [["--rate", "0"], ["--rate", "none"]])
def test_a_zero_rate_flag_is_refused(project, run_cli, args):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--dry-run", *args)
    assert_fails(result, 2, "--rate", "unlimited")


@pytest.mark.parametrize("args", [["--format", "xml"], ["--format", "jsonl"], ["--output", "out"]])
def test_dry_run_options_are_refused_on_a_real_send(project, run_cli, args, smtp_server):
    project.csv(CONTACTS)
    project.template("From: a@acme.example\n" + TEMPLATE)
    project.config(f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_server.port}\nsecurity = "none"\n')
    result = run_cli("send", "contacts.csv", "mail.txt.j2", "--yes", *args)
    assert_fails(result, 2, "for dry runs only")
    assert smtp_server.messages == []


def test_the_list_unsubscribe_url_is_percent_encoded(project, run_cli):
    project.csv('email,name\nann@example.com,"\u00c4nn <x>, y"\n')
    project.template("From: a@acme.example\nSubject: Hi\n\n{{ unsubscribe_url }}\n")
    project.config('[message]\nlist_unsubscribe = "https://acme.example/u/\u00fc?n={{ name }}&e={{ email }}"\n')
    result, summary, messages = dry_run(project, run_cli)
    assert result.exit_code == 0, result.stderr
    header = str(messages[0]["List-Unsubscribe"])
    assert header == "<https://acme.example/u/%C3%BC?n=%C3%84nn%20%3Cx%3E%2C%20y&e=ann@example.com>", header
    assert "=?" not in messages[0].as_string().split("List-Unsubscribe:")[1].split("\n")[0]


def test_web_section_loads_names_only(tmp_path):
    path = tmp_path / "mailer.toml"
    path.write_text(
        '[web]\nbase_url = "https://mail.acme.example"\nsecret_env = "ACME_WEB_KEY"\n'
        'previous_secret_envs = ["ACME_WEB_KEY_2025"]\nlisten = "[::1]:9000"\n',
        encoding="utf-8",
    )
    web = load_config(path).web
    assert web is not None
    assert (web.base_url, web.secret_env, web.previous_secret_envs) == (
        "https://mail.acme.example",
        "ACME_WEB_KEY",
        ("ACME_WEB_KEY_2025",),
    )
    assert web.listen_address == ("::1", 9000)
    path.write_text("[web]\n", encoding="utf-8")
    web = load_config(path).web
    assert web is not None and web.secret_env == "MAILER_WEB_SECRET" and web.listen_address == ("127.0.0.1", 8025)
    assert Config().web is None


@pytest.mark.parametrize(
    ("toml", "key", "shown"),
    [
        ('secret_env = "Zq8vN3kP0wLx7TdY2mRb5sHc"', "web.secret_env", False),
        ('secret_env = "has space"', "web.secret_env", False),
        ('previous_secret_envs = ["OK_NAME", "Zq8vN3kP0wLx7TdY2mRb"]', "web.previous_secret_envs", False),
        ("previous_secret_envs = [1]", "web.previous_secret_envs", True),
        ('base_url = "ftp://mail.acme.example"', "web.base_url", True),
        ('base_url = "mail.acme.example"', "web.base_url", True),
        ('base_url = "https://mail.acme.example/?x=1"', "web.base_url", True),
        ('listen = "8025"', "web.listen", True),
        ('listen = "127.0.0.1:99999"', "web.listen", True),
        ('colour = "blue"', "web.colour", True),
    ],
)
def test_bad_web_section_names_the_key(tmp_path, toml, key, shown):
    path = tmp_path / "mailer.toml"
    path.write_text(f"[web]\n{toml}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert str(path) in str(caught.value)
    if not shown:
        assert "Zq8vN3kP0wLx7TdY2mRb" not in str(caught.value)
