"""A real SMTP server on loopback for the delivery tests.

aiosmtpd runs in its own thread and event loop on 127.0.0.1 and a free port. Its
handler records every transaction and can be told, per recipient (or sender, for the
MAIL stage), to misbehave: answer with any reply, fail the first N times, drop the
connection (a real close of the transport), stall past the client's timeout, or close
a connection once it has carried N messages. Server options cover STARTTLS and
implicit TLS with a throwaway CA, AUTH with a test password, SMTPUTF8 and PIPELINING
on or off, and an idle timeout.

Fixtures: ``smtp_server`` (a default server), ``make_smtp_server`` (a factory taking
the options of :class:`TestSMTPServer`), ``tls_files`` and ``client_tls_context``.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

__all__ = ["TEST_USERNAME", "Fault", "TLSFiles", "TestSMTPServer", "Transaction"]

TEST_USERNAME = "mailer-test"


@dataclass
class Transaction:
    """One transaction the server accepted (250 after the DATA content)."""

    connection: int  # which connection (1, 2, ... in the order of their EHLO)
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    started: float  # time.monotonic() when MAIL FROM arrived
    finished: float  # time.monotonic() at the end of DATA
    peer: str = ""  # the client's address, as the server saw it


@dataclass
class Fault:
    """How the server misbehaves at one stage for one address.

    ``stage`` is "mail", "rcpt" or "data". ``reply`` replaces the normal answer (a 2xx
    reply is a success: the command takes effect, so ``stall`` with a 2xx slows down);
    ``drop`` closes the connection instead of answering ("data": after the content was
    received); ``stall`` waits that many seconds first (then answers ``reply``, or 451).
    ``times``: only the first N matching commands misbehave (None: all of them).
    ``reused_only``: only on a connection that already carried a message.
    """

    stage: str
    reply: str | None = None
    drop: bool = False
    stall: float = 0.0
    times: int | None = None
    reused_only: bool = False
    hits: int = 0


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


class _RecordingHandler:
    def __init__(self, owner: TestSMTPServer) -> None:
        self.owner = owner

    def _connection(self, server) -> int:
        # Per connection state lives on the protocol object (one per connection):
        # aiosmtpd starts a new session after STARTTLS.
        conn = getattr(server, "mailer_test_id", None)
        if conn is None:
            with self.owner.lock:
                self.owner.connections += 1
                conn = server.mailer_test_id = self.owner.connections
                server.mailer_test_messages = 0
        return conn

    async def _fault(self, server, session, stage: str, address: str) -> str | None:
        owner = self.owner
        with owner.lock:
            fault = owner.faults.get((stage, address)) or owner.faults.get((stage, "*"))
            if fault is None or (fault.reused_only and not server.mailer_test_messages):
                return None
            if fault.times is not None and fault.hits >= fault.times:
                return None
            fault.hits += 1
        if fault.stall:
            await asyncio.sleep(fault.stall)
        if fault.drop:
            server.transport.close()  # a real close: the client reads EOF, no reply
            await asyncio.sleep(3600)  # connection_lost() cancels this task
        return fault.reply or ("451 4.4.2 stalled" if fault.stall else None)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self._connection(server)
        session.host_name = hostname
        with self.owner.lock:
            self.owner.greetings.append((session.peer[0], hostname))
        if self.owner.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        self._connection(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self._connection(server)
        server.mailer_test_started = time.monotonic()
        with self.owner.lock:
            self.owner.mail_times.append(server.mailer_test_started)
        reply = await self._fault(server, session, "mail", address)
        if reply and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.mailer_test_peer = session.peer[0]
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.owner.lock:
            self.owner.rcpt_attempts.append((server.mailer_test_id, address))
        reply = await self._fault(server, session, "rcpt", address)
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        owner = self.owner
        reply = await self._fault(server, session, "data", envelope.rcpt_tos[0])
        if reply and not reply.startswith("2"):
            return reply
        record = Transaction(
            connection=server.mailer_test_id,
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            mail_options=list(envelope.mail_options),
            started=server.mailer_test_started,
            finished=time.monotonic(),
            peer=server.mailer_test_peer,
        )
        with owner.lock:
            owner.messages.append(record)
            server.mailer_test_messages += 1
            close = owner.close_after is not None and server.mailer_test_messages >= owner.close_after
        if close:
            # Close right after the 250 goes out, as a relay does on its idle timeout:
            # the client finds out only when it tries the next transaction.
            transport, notice = server.transport, owner.close_notice
            loop = asyncio.get_running_loop()

            def hang_up() -> None:
                if notice:
                    transport.write(notice.encode() + b"\r\n")
                transport.close()

            loop.call_soon(hang_up)
        return reply or "250 2.0.0 OK: queued"

    async def handle_QUIT(self, server, session, envelope):
        with self.owner.lock:
            self.owner.quits += 1
        return "221 2.0.0 Bye"


class _Controller(Controller):
    """aiosmtpd's Controller, bound to port 0 (the kernel picks a free port)."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class TestSMTPServer:
    """A recording SMTP server on 127.0.0.1.

    Options: ``starttls`` (offer STARTTLS with the test certificate), ``implicit_tls``
    (TLS from the first byte), ``password`` (require AUTH as :data:`TEST_USERNAME` with
    this password), ``auth_require_tls`` (offer AUTH only over TLS), ``smtputf8``,
    ``pipelining``, ``idle_timeout`` (seconds before an idle connection is closed),
    ``auth_exclude`` (AUTH mechanisms not offered). ``host`` is any 127.0.0.0/8 address
    (all of them are on ``lo``), so that several servers play different relays; ``port``
    0 picks a free one (give the old one to bring a stopped relay back).
    ``greetings`` records (peer address, EHLO name) of every EHLO.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        *,
        tls_files: TLSFiles | None = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        password: str | None = None,
        auth_require_tls: bool = True,
        smtputf8: bool = True,
        pipelining: bool = True,
        idle_timeout: float = 300.0,
        auth_exclude: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.lock = threading.Lock()
        self.greetings: list[tuple[str, str]] = []
        self.messages: list[Transaction] = []
        self.rcpt_attempts: list[tuple[int, str]] = []
        self.mail_times: list[float] = []
        self.auth_attempts: list[tuple[str, bool]] = []  # (login, accepted); never the password
        self.faults: dict[tuple[str, str], Fault] = {}
        self.connections = 0
        self.quits = 0
        self.close_after: int | None = None
        self.close_notice: str | None = None
        self.pipelining = pipelining
        self.password = password
        self.auth_reject_reply: str | None = None
        kwargs: dict = {"enable_SMTPUTF8": smtputf8, "timeout": idle_timeout, "ready_timeout": 10.0}
        if starttls or implicit_tls:
            if tls_files is None:
                raise ValueError("TLS needs the tls_files fixture")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls_files.cert, tls_files.key)
            if implicit_tls:
                kwargs["ssl_context"] = context
            else:
                kwargs["tls_context"] = context
        if password is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True, auth_require_tls=auth_require_tls)
            if auth_exclude:  # e.g. ("PLAIN",): the client must use LOGIN
                kwargs["auth_exclude_mechanism"] = list(auth_exclude)
        self.host = host
        self._controller = _Controller(_RecordingHandler(self), hostname=self.host, port=port, **kwargs)
        self._controller.start()
        self.port: int = self._controller.port

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        login = auth_data.login.decode()
        ok = login == TEST_USERNAME and auth_data.password.decode() == self.password
        with self.lock:
            self.auth_attempts.append((login, ok))
        if ok or self.auth_reject_reply is None:
            return AuthResult(success=ok)
        return AuthResult(success=False, handled=False, message=self.auth_reject_reply)

    def set_fault(self, address: str, stage: str, reply: str | None = None, **options) -> Fault:
        """Make the server misbehave for ``address`` ("*": any) at ``stage``; see :class:`Fault`."""
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(stage)
        fault = Fault(stage=stage, reply=reply, **options)
        with self.lock:
            self.faults[(stage, address)] = fault
        return fault

    def close_connections_after(self, count: int, *, notice: str | None = None) -> None:
        """Close every connection right after it carried ``count`` messages (optionally
        sending ``notice``, such as a 421 idle-timeout line, first)."""
        self.close_after, self.close_notice = count, notice

    def received_by(self, address: str) -> list[Transaction]:
        with self.lock:
            return [m for m in self.messages if address in m.rcpt_tos]

    def messages_per_connection(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        with self.lock:
            for message in self.messages:
                counts[message.connection] = counts.get(message.connection, 0) + 1
        return counts

    def stop(self) -> None:
        self._controller.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    """A throwaway CA and a certificate for 127.0.0.1 / localhost signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("tls")
    (folder / "ca.cnf").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n"
    )
    (folder / "server.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *ec, "-keyout", "ca.key", "-out", "ca.csr", "-subj", "/CN=mailer test CA", cwd=folder)
    _openssl(
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-signkey",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-extfile",
        "ca.cnf",
        cwd=folder,
    )
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.cnf",
        cwd=folder,
    )
    return TLSFiles(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")


@pytest.fixture
def client_tls_context(tls_files) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    return ssl.create_default_context(cafile=str(tls_files.ca))


@pytest.fixture
def make_smtp_server(request):
    """A factory of :class:`TestSMTPServer`; every server is stopped after the test.
    Pass ``tls=True`` for the test certificate (needs openssl)."""
    servers: list[TestSMTPServer] = []

    def make(*, tls: bool = False, **options) -> TestSMTPServer:
        if tls or options.get("starttls") or options.get("implicit_tls"):
            options["tls_files"] = request.getfixturevalue("tls_files")
        server = TestSMTPServer(**options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server(make_smtp_server) -> TestSMTPServer:
    """A plain recording server: no TLS, no AUTH, PIPELINING and SMTPUTF8 offered."""
    return make_smtp_server()
