"""Bounce and complaint reports shaped like the ones real providers send (written for
these tests from the RFCs and the providers' documented formats; no sample copied).

Each builder takes the bounced recipient, the original's Message-ID and the address
the report is delivered to (the envelope sender of the original: a VERP address when
the stream has one) and returns the raw bytes, CRLF-free (as an MDA stores them).
"""

from __future__ import annotations

_ORIGINAL_HEADERS = """\
Return-Path: <{envelope}>
From: Acme News <news@acme.example>
To: {recipient}
Subject: Our December news
Date: Wed, 02 Dec 2026 13:00:00 +0000
Message-ID: {message_id}
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
"""


def postfix_dsn(
    recipient: str,
    message_id: str,
    envelope: str,
    *,
    status: str = "5.1.1",
    diagnostic: str | None = None,
    report_id: str = "<20261202140105.4F1E23C0A1@mx1.acme.example>",
) -> bytes:
    """Postfix's bounce(8) DSN: prose, message/delivery-status, text/rfc822-headers."""
    diagnostic = diagnostic or (
        f"smtp; 550 {status} <{recipient}>: Recipient address rejected: User unknown in virtual mailbox table"
    )
    return f"""\
Return-Path: <>
Delivered-To: {envelope}
Received: by mx1.acme.example (Postfix) id 4F1E23C0A1; Wed,  2 Dec 2026 14:01:05 +0000 (UTC)
Date: Wed,  2 Dec 2026 14:01:05 +0000 (UTC)
From: MAILER-DAEMON@mx1.acme.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {envelope}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4F1E23C0A1.1764684065/mx1.acme.example"
Content-Transfer-Encoding: 8bit
Message-Id: {report_id}

This is a MIME-encapsulated message.

--4F1E23C0A1.1764684065/mx1.acme.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.acme.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

                   The mail system

<{recipient}>: host mail.example.org[192.0.2.25] said: 550 {status}
    <{recipient}>: Recipient address rejected: User unknown (in reply to RCPT TO
    command)

--4F1E23C0A1.1764684065/mx1.acme.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.acme.example
X-Postfix-Queue-ID: 4F1E23C0A1
X-Postfix-Sender: rfc822; {envelope}
Arrival-Date: Wed,  2 Dec 2026 14:00:59 +0000 (UTC)

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: failed
Status: {status}
Remote-MTA: dns; mail.example.org
Diagnostic-Code: {diagnostic}

--4F1E23C0A1.1764684065/mx1.acme.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
--4F1E23C0A1.1764684065/mx1.acme.example--
""".encode()


def postfix_delayed(recipient: str, message_id: str, envelope: str) -> bytes:
    """Postfix's delay warning: Action: delayed, 4.4.1, Will-Retry-Until."""
    return f"""\
Return-Path: <>
Date: Wed,  2 Dec 2026 18:01:05 +0000 (UTC)
From: MAILER-DAEMON@mx1.acme.example (Mail Delivery System)
Subject: Delayed Mail (still being retried)
To: {envelope}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="DLY.1/mx1"
Message-Id: <20261202180105.77AA23C0B2@mx1.acme.example>

--DLY.1/mx1
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.acme.example.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than 4 hour(s).
It will be retried until it is 5 day(s) old.

<{recipient}>: connect to mail.example.net[192.0.2.80]:25: Connection timed out

--DLY.1/mx1
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.acme.example
X-Postfix-Queue-ID: 77AA23C0B2
Arrival-Date: Wed,  2 Dec 2026 14:00:59 +0000 (UTC)

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to mail.example.net[192.0.2.80]:25: Connection
    timed out
Will-Retry-Until: Mon,  7 Dec 2026 14:00:59 +0000 (UTC)

--DLY.1/mx1
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
--DLY.1/mx1--
""".encode()


def exchange_ndr(recipient: str, message_id: str, envelope: str, *, status: str = "5.1.10") -> bytes:
    """Exchange Online / Outlook.com NDR: HTML prose, delivery-status with the
    RESOLVER codes, the whole original as message/rfc822."""
    reason = (
        "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
        if status.startswith("5.1")
        else "Service unavailable, Client host [192.0.2.10] blocked using Spamhaus"
    )
    return f"""\
Received: from DM6PR11MB1234.namprd11.prod.outlook.com by DM6PR11MB1234.namprd11.prod.outlook.com
 with mapi id 15.20.8207.017; Wed, 2 Dec 2026 14:02:10 +0000
From: Microsoft Outlook <postmaster@contoso.onmicrosoft.com>
To: <{envelope}>
Date: Wed, 2 Dec 2026 14:02:10 +0000
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="b4e1f0a2-7c3d-4e55-9a10-2f6c1d0e9b77"
X-MS-Exchange-Message-Is-Ndr:
Content-Language: en-US
Message-ID: <b1c2d3e4-0001-4a5b-8c9d-aabbccddeeff@DM6PR11MB1234.namprd11.prod.outlook.com>
In-Reply-To: {message_id}
Subject: Undeliverable: Our December news
MIME-Version: 1.0

--b4e1f0a2-7c3d-4e55-9a10-2f6c1d0e9b77
Content-Type: multipart/alternative; differences=Content-Type;
\tboundary="d7a8c9e0-1111-4f22-8333-444455556666"

--d7a8c9e0-1111-4f22-8333-444455556666
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

Your message to {recipient} couldn't be delivered.
{recipient.split("@")[0]} wasn't found at {recipient.split("@")[1]}.
Office 365 Remote Server returned '550 {status} {reason}'

--d7a8c9e0-1111-4f22-8333-444455556666
Content-Type: text/html; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Your message to {recipient} couldn't be delivered.</p></body></html>

--d7a8c9e0-1111-4f22-8333-444455556666--

--b4e1f0a2-7c3d-4e55-9a10-2f6c1d0e9b77
Content-Type: message/delivery-status

Reporting-MTA: dns;DM6PR11MB1234.namprd11.prod.outlook.com
Received-From-MTA: dns;mta1.acme.example
Arrival-Date: Wed, 2 Dec 2026 14:02:09 +0000

Final-Recipient: rfc822;{recipient}
Action: failed
Status: {status}
Diagnostic-Code: smtp;550 {status} {reason} [DM6PR11MB1234.namprd11.prod.outlook.com 2026-12-02T14:02:10.123Z]
X-Display-Name: {recipient.split("@")[0]}

--b4e1f0a2-7c3d-4e55-9a10-2f6c1d0e9b77
Content-Type: message/rfc822

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
Hello from Acme.

--b4e1f0a2-7c3d-4e55-9a10-2f6c1d0e9b77--
""".encode()


def gmail_dsn(recipient: str, message_id: str, envelope: str, *, status: str = "5.1.1") -> bytes:
    """Gmail's "Delivery Status Notification (Failure)" (as Gmail sends for mail it
    relayed): Mail Delivery Subsystem, prose with the support link, delivery-status
    whose Diagnostic-Code is the multi-line 550-5.1.1 reply, the original attached."""
    if status == "5.1.1":
        lines = (
            "smtp; 550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
            "    550-5.1.1 double-checking the recipient's email address for typos or\n"
            "    550 5.1.1 https://support.google.com/mail/?p=NoSuchUser a1-20020a17090 - gsmtp"
        )
    else:
        lines = (
            f"smtp; 550-{status} This mail has been blocked because the sender is\n"
            f"    550-{status} unauthenticated. Gmail requires all senders to authenticate with\n"
            f"    550 {status} either SPF or DKIM. b2-20020a17090 - gsmtp"
        )
    return f"""\
Return-Path: <>
Delivered-To: {envelope}
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {envelope}
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
References: {message_id}
In-Reply-To: {message_id}
X-Failed-Recipients: {recipient}
Message-ID: <6745a1b2.050a0220.3c1d9.8e10.GMR@mx.google.com>
Date: Wed, 02 Dec 2026 06:02:30 -0800 (PST)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000a1b2c3d4e5f60718"; report-type=delivery-status

--000000000000a1b2c3d4e5f60718
Content-Type: multipart/related; boundary="000000000000a1b2c3d4e5f6071b"

--000000000000a1b2c3d4e5f6071b
Content-Type: multipart/alternative; boundary="000000000000a1b2c3d4e5f6071c"

--000000000000a1b2c3d4e5f6071c
Content-Type: text/plain; charset="UTF-8"

** Address not found **

Your message wasn't delivered to {recipient} because the address couldn't be found, or is unable to receive mail.

Learn more here: https://support.google.com/mail/?p=NoSuchUser

--000000000000a1b2c3d4e5f6071c
Content-Type: text/html; charset="UTF-8"

<html><body><h2>Address not found</h2></body></html>

--000000000000a1b2c3d4e5f6071c--

--000000000000a1b2c3d4e5f6071b--

--000000000000a1b2c3d4e5f60718
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Received-From-MTA: dns; mta1.acme.example
Arrival-Date: Wed, 02 Dec 2026 06:02:29 -0800 (PST)
X-Original-Message-ID: {message_id}

Final-Recipient: rfc822; {recipient}
Action: failed
Status: {status}
Remote-MTA: dns; gmail-smtp-in.l.google.com. (142.250.0.27, the server for the domain gmail.com.)
Diagnostic-Code: {lines}
Last-Attempt-Date: Wed, 02 Dec 2026 06:02:30 -0800 (PST)

--000000000000a1b2c3d4e5f60718
Content-Type: message/rfc822

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
Hello from Acme.

--000000000000a1b2c3d4e5f60718--
""".encode()


def yahoo_dsn(recipient: str, message_id: str, envelope: str) -> bytes:
    """Yahoo's "Failure Notice": Status 5.0.0, the reason only in the 554 "dd" text."""
    return f"""\
Return-Path: <>
From: MAILER-DAEMON@yahoo.com
To: {envelope}
Subject: Failure Notice
Date: Wed, 2 Dec 2026 14:03:00 +0000
Message-ID: <1764684180.123456.yahoo-bounce@mta4012.mail.gq1.yahoo.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="yh_bnd_1"

--yh_bnd_1
Content-Type: text/plain; charset=us-ascii

Sorry, we were unable to deliver your message to the following address.

<{recipient}>:
554: delivery error: dd This user doesn't have a yahoo.com account ({recipient}) [0] - mta4012.mail.gq1.yahoo.com

--yh_bnd_1
Content-Type: message/delivery-status

Reporting-MTA: dns; mta4012.mail.gq1.yahoo.com
Arrival-Date: Wed, 2 Dec 2026 14:02:59 +0000

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.0.0
Diagnostic-Code: smtp; 554 delivery error: dd This user doesn't have a yahoo.com account ({recipient}) [0] - mta4012.mail.gq1.yahoo.com

--yh_bnd_1
Content-Type: text/rfc822-headers

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
--yh_bnd_1--
""".encode()


def yahoo_arf(message_id: str, envelope: str, *, recipient: str = "redacted@yahoo.com") -> bytes:
    """Yahoo's complaint feedback loop: ARF, recipient redacted, no Original-Rcpt-To;
    only the original's Message-ID (or its VERP Return-Path) names the recipient."""
    return f"""\
From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.com>
To: {envelope}
Subject: FW: Our December news
Date: Wed, 2 Dec 2026 15:00:00 +0000
Message-ID: <arf-1764687600-991@arf.mail.yahoo.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="arf_yh_77"

--arf_yh_77
Content-Type: text/plain; charset="us-ascii"

This is an email abuse report for an email message received from IP 192.0.2.10 on Wed, 2 Dec 2026 13:00:01 +0000

--arf_yh_77
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: Yahoo!-Mail-Feedback/2.0
Version: 0.1
Original-Mail-From: <{envelope}>
Arrival-Date: Wed, 2 Dec 2026 13:00:01 +0000
Reported-Domain: acme.example
Authentication-Results: mta1.mail.yahoo.com  dkim=pass header.i=@acme.example

--arf_yh_77
Content-Type: message/rfc822

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
Hello from Acme.

--arf_yh_77--
""".encode()


def outlook_jmrp(recipient: str, message_id: str, envelope: str) -> bytes:
    """Outlook.com's Junk Mail Reporting Program: ARF with the original attached and
    the recipient in X-HmXmrOriginalRecipient (no Original-Rcpt-To)."""
    return f"""\
From: staff@hotmail.com
To: jmrp@acme.example
Subject: complaint about message from 192.0.2.10
Date: Wed, 2 Dec 2026 16:00:00 +0000
Message-ID: <jmrp-6f1e2d3c4b5a@hotmail.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="jmrp_b_9"

--jmrp_b_9
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.10 on Wed, 02 Dec 2026 13:00:01 -0800.
For more information about this format please see http://tools.ietf.org/html/rfc5965.

--jmrp_b_9
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: Microsoft JMR
Version: 1.0
Arrival-Date: Wed, 02 Dec 2026 13:00:01 -0800
Source-IP: 192.0.2.10

--jmrp_b_9
Content-Type: message/rfc822

X-HmXmrOriginalRecipient: <{recipient}>
{_ORIGINAL_HEADERS.format(envelope=envelope, recipient="undisclosed-recipients:;", message_id=message_id)}
Hello from Acme.

--jmrp_b_9--
""".encode()


def qmail_bounce(recipient: str, message_id: str, envelope: str) -> bytes:
    """qmail's QSBMF bounce: no MIME report at all, only prose (flufl.bounce's Qmail
    detector reads it); the original follows the break line."""
    return f"""\
Return-Path: <>
Date: 2 Dec 2026 14:04:00 -0000
From: MAILER-DAEMON@mail.example.net
To: {envelope}
Subject: failure notice
Message-ID: <20261202140400.31337.qmail@mail.example.net>

Hi. This is the qmail-send program at mail.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<{recipient}>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

{_ORIGINAL_HEADERS.format(envelope=envelope, recipient=recipient, message_id=message_id)}
Hello from Acme.
""".encode()


def human_reply(message_id: str) -> bytes:
    """Not a report: a person answering the newsletter (quoting an address)."""
    return f"""\
From: Ann <ann@example.org>
To: news@acme.example
Subject: Re: Our December news
In-Reply-To: {message_id}
Message-ID: <reply-1@example.org>

Thanks! Please also send it to bob@example.org.
""".encode()


def broken_report() -> bytes:
    """Claims to be a DSN, but the delivery-status part has no recipient block at all."""
    return b"""\
From: MAILER-DAEMON@mx.example
Subject: Undelivered Mail Returned to Sender
Message-ID: <broken-1@mx.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="x"

--x
Content-Type: message/delivery-status

\x00\xff\xfe garbage ;;; : : :
--x--
"""
