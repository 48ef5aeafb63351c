"""The --debug SMTP trace: both sides of the conversation, never the password."""

from __future__ import annotations

import base64

from mailer.smtp.trace import REDACTED, Trace

PASSWORD = "Tr1cky-pa55"


def trace_of(exchange: list[tuple[str, bytes]]) -> str:
    out: list[str] = []
    secrets = (PASSWORD, base64.b64encode(PASSWORD.encode()).decode())
    trace = Trace(out.append, number=3, secrets=secrets)
    for side, data in exchange:
        if side == "C":
            trace.client(data)
        else:
            trace.server(data)
    return "".join(out)


def test_an_auth_login_exchange_keeps_only_the_mechanism_and_the_replies():
    text = trace_of(
        [
            ("C", b"AUTH LOGIN " + base64.b64encode(b"user") + b"\r\n"),
            ("S", b"334 UGFzc3dvcmQ6\r\n"),
            ("C", base64.b64encode(PASSWORD.encode()) + b"\r\n"),
            ("S", b"235 2.7.0 Authentication successful\r\n"),
            ("C", b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"),
        ]
    )
    assert text.splitlines() == [
        f"smtp[3] C: AUTH LOGIN {REDACTED}",
        "smtp[3] S: 334 UGFzc3dvcmQ6",
        f"smtp[3] C: {REDACTED}",
        "smtp[3] S: 235 2.7.0 Authentication successful",
        "smtp[3] C: MAIL FROM:<a@example.com>",
        "smtp[3] C: RCPT TO:<b@example.com>",
        "smtp[3] C: DATA",
    ]


def test_a_relay_echoing_the_password_is_scrubbed_and_a_message_is_shown_by_size():
    text = trace_of(
        [
            ("C", b"AUTH PLAIN " + base64.b64encode(f"\0u\0{PASSWORD}".encode()) + b"\r\n"),
            ("S", f"535 5.7.8 bad credentials {PASSWORD}\r\n".encode()),
            ("C", b"Subject: hi\r\n\r\nbody\r\n.\r\n"),
        ]
    )
    assert PASSWORD not in text and base64.b64encode(PASSWORD.encode()).decode() not in text
    assert f"S: 535 5.7.8 bad credentials {REDACTED}" in text
    assert "C: (the message: 24 bytes" in text and "body" not in text
