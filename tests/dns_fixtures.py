"""A real authoritative DNS responder on loopback, for tests (loaded by conftest.py).

The ``dns_server`` fixture starts one per test on 127.0.0.1 at a free port, answering
on UDP and on TCP at the same port (dnspython's resolver retries over TCP when a UDP
answer comes back truncated). Tests give it a zone as a dict::

    dns_server.set_zone({
        ("example.test", "MX"): ["10 mx.example.test."],
        ("_dmarc.example.test", "TXT"): ['"v=DMARC1; p=reject"'],
    })

Names in the zone answer with their records; names that exist with other types, and
empty non-terminals (the parents of zone names), answer NOERROR with no records; any
other name is NXDOMAIN. Faults: ``set_fault(name, "timeout")`` never answers,
``"servfail"`` and ``"refused"`` answer with that rcode; ``latency`` delays every
answer without blocking the others. ``queries`` logs every question received, so
tests can assert caching and concurrency.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import NamedTuple

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from mailer.core.config import DNSConfig

__all__ = ["DNSTestServer", "Query", "dns_server"]


class Query(NamedTuple):
    """One question received: name (lower case, no final dot), type ("MX"), transport ("udp"/"tcp")."""

    name: str
    rdtype: str
    transport: str


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _txt_rdata(value: str) -> str:
    """Quote a bare TXT value, split into 255-byte strings (RFC 1035 §3.3.14)."""
    if value.startswith('"'):
        return value
    escaped = [value[i : i + 255].replace("\\", "\\\\").replace('"', '\\"') for i in range(0, len(value), 255)]
    return " ".join(f'"{chunk}"' for chunk in escaped) or '""'


class DNSTestServer:
    """An authoritative responder for one test zone; see the module docstring."""

    def __init__(self, zone: dict | None = None, *, ttl: int = 300) -> None:
        self.ttl = ttl
        self.latency = 0.0
        self.queries: list[Query] = []
        self.port = 0
        self._lock = threading.Lock()
        self._rrsets: dict[tuple[str, str], dns.rrset.RRset] = {}
        self._names: set[str] = set()
        self._faults: dict[tuple[str, str | None], str] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        if zone:
            self.set_zone(zone)

    # ------------------------------------------------------------- zone

    def set_zone(self, zone: dict) -> None:
        """Replace the whole zone: ``{(name, type): [rdata text, ...]}``."""
        with self._lock:
            self._rrsets.clear()
            self._names.clear()
        for (name, rdtype), records in zone.items():
            self.add(name, rdtype, records)

    def add(self, name: str, rdtype: str, records: list[str] | str) -> None:
        """Add (or replace) the records of one name and type.

        TXT values without surrounding quotes are quoted and split into 255-byte
        strings for you; quoted ones are used as written.
        """
        if isinstance(records, str):
            records = [records]
        name, rdtype = _normalize(name), rdtype.upper()
        if rdtype == "TXT":
            records = [_txt_rdata(r) for r in records]
        rrset = dns.rrset.from_text_list(name + ".", self.ttl, "IN", rdtype, list(records))
        with self._lock:
            self._rrsets[(name, rdtype)] = rrset
            # The name and its parents exist (parents as empty non-terminals, RFC 8020).
            labels = name.split(".")
            for i in range(len(labels)):
                self._names.add(".".join(labels[i:]))

    def set_fault(self, name: str, fault: str | None, *, rdtype: str | None = None) -> None:
        """Make a name (or one type at it) fail: "timeout", "servfail", "refused", or None to clear."""
        if fault not in (None, "timeout", "servfail", "refused"):
            raise ValueError(f"unknown fault {fault!r}")
        key = (_normalize(name), rdtype.upper() if rdtype else None)
        with self._lock:
            if fault is None:
                self._faults.pop(key, None)
            else:
                self._faults[key] = fault

    def count(self, name: str | None = None, rdtype: str | None = None, transport: str | None = None) -> int:
        """How many logged questions match (None matches anything)."""
        name = _normalize(name) if name else None
        with self._lock:
            return sum(
                1
                for q in self.queries
                if (name is None or q.name == name)
                and (rdtype is None or q.rdtype == rdtype.upper())
                and (transport is None or q.transport == transport)
            )

    def config(self, *, timeout: float = 0.5) -> DNSConfig:
        """A ``[dns]`` config that points a resolver at this server."""
        return DNSConfig(nameservers=("127.0.0.1",), port=self.port, timeout=timeout)

    # ------------------------------------------------------------- answering

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except Exception:
            return None  # not DNS: drop it, as a real server would
        name = _normalize(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append(Query(name, rdtype, transport))
            fault = self._faults.get((name, rdtype)) or self._faults.get((name, None))
            rrset = self._rrsets.get((name, rdtype))
            exists = name in self._names
        if fault == "timeout":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if fault == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif fault == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif rrset is not None:
            response.answer.append(rrset)
        elif not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        wire_out = response.to_wire()
        if transport == "udp":
            # RFC 1035 §4.2.1: 512 bytes over UDP unless the query offers more (EDNS).
            limit = max(512, query.payload) if query.edns >= 0 else 512
            if len(wire_out) > limit:
                response.answer = []
                response.flags |= dns.flags.TC
                wire_out = response.to_wire()
        return wire_out

    # ------------------------------------------------------------- sockets

    def start(self) -> DNSTestServer:
        """Bind UDP and TCP on one free loopback port and start answering."""
        for _attempt in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            break
        else:
            raise RuntimeError("no free port with both UDP and TCP available")
        # Many resolver threads at once: a larger receive buffer avoids drops.
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._thread = threading.Thread(target=self._serve, name=f"dns-test-server:{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the sockets."""
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._udp, selectors.EVENT_READ, "udp")
        selector.register(self._tcp, selectors.EVENT_READ, "tcp")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stopping.is_set():
            for key, _ in selector.select(timeout=1.0):
                if key.data == "udp":
                    try:
                        wire, peer = self._udp.recvfrom(65535)
                    except OSError:
                        continue
                    self._reply_udp(wire, peer)
                elif key.data == "tcp":
                    try:
                        conn, _ = self._tcp.accept()
                    except OSError:
                        continue
                    threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()
        selector.close()

    def _reply_udp(self, wire: bytes, peer) -> None:
        def send() -> None:
            out = self.answer(wire, "udp")
            if out is not None and not self._stopping.is_set():
                try:
                    self._udp.sendto(out, peer)
                except OSError:
                    pass

        if self.latency > 0:
            # A timer per answer, so that slow answers overlap like a real server's.
            timer = threading.Timer(self.latency, send)
            timer.daemon = True
            timer.start()
        else:
            send()

    def _serve_tcp(self, conn: socket.socket) -> None:
        # RFC 1035 §4.2.2: each message is preceded by a two-byte length.
        with conn:
            conn.settimeout(5)
            try:
                while True:
                    header = self._recv_exactly(conn, 2)
                    if header is None:
                        return
                    wire = self._recv_exactly(conn, struct.unpack("!H", header)[0])
                    if wire is None:
                        return
                    out = self.answer(wire, "tcp")
                    if out is None:
                        continue  # "timeout": stay silent, the client gives up
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return

    @staticmethod
    def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data


@pytest.fixture
def dns_server():
    """A running :class:`DNSTestServer` with an empty zone; stopped after the test."""
    server = DNSTestServer().start()
    try:
        yield server
    finally:
        server.stop()
