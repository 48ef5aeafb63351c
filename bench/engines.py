#!/usr/bin/env python3
"""Threads or asyncio for many slow sessions: the threaded pool against the asyncio engine.

    python bench/engines.py --messages 20000 --delay 0.05 --sessions 100,500,1000

Both engines hold the same number of SMTP sessions open against the same sink
(tests/bdat_server.py in a child process: PIPELINING + CHUNKING, every group of replies
written after --delay, as a network round trip). The threaded pool (mailer.delivery.pool,
the relay path) gets one relay with ``connections`` = N: one thread per session. The
asyncio engine (mailer.delivery.direct) gets N/4 domains with 4 connections each, all of
whose MX records point at the sink: one coroutine per session. Each case runs in a fresh
process, so that its peak RSS is its own; the figures are messages per second, CPU
seconds per 1,000 messages (user + system of that process), peak RSS and the most
sessions open at once. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

SINK = (
    "import sys,time; sys.path.insert(0, sys.argv[1]);"
    "from bdat_server import BDATServer;"
    "s = BDATServer(delay=float(sys.argv[2]), record=False); print(s.port, flush=True); time.sleep(1e9)"
)
BODY = b"Subject: bench\r\n\r\n" + b"x" * 1800 + b"\r\n"
PER_DOMAIN = 4


class Count:
    thread_safe = True

    def __init__(self) -> None:
        self.final = 0
        self.lock = threading.Lock()

    def on_sending(self, item: object, attempt: int) -> None:
        pass

    def on_result(self, item: object, result: object) -> None:
        if getattr(result, "final", True):
            with self.lock:
                self.final += 1


def _items(messages: int, domains: int):
    from mailer.core.outcomes import Outgoing

    return (
        Outgoing(
            key=n,
            sender="b@sender.test",
            recipients=[f"u{n}@d{n % domains}.test"],
            data=b"To: u%d\r\n" % n + BODY,
            message_id=str(n),
        )
        for n in range(messages)
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_threads(port: int, sessions: int, messages: int) -> dict:
    from mailer.core.config import SendConfig, SMTPConfig
    from mailer.delivery.pool import deliver

    smtp = SMTPConfig(host="127.0.0.1", port=port, security="none", timeout=60.0)
    send = SendConfig(connections=sessions, max_per_connection=1_000_000, rate="unlimited")
    count = Count()
    cpu, started = _cpu(), time.monotonic()
    stats = deliver(
        _items(messages, 1), smtp=smtp, send=send, listener=count, stop=threading.Event(), queue_size=4 * sessions
    )
    elapsed, cpu = time.monotonic() - started, _cpu() - cpu
    return {"sent": stats.sent, "elapsed": elapsed, "cpu": cpu, "peak_sessions": sessions}


def run_asyncio(port: int, sessions: int, messages: int, dns_port: int, loop: str) -> dict:
    from mailer.delivery.direct import DirectSettings, deliver_direct
    from mailer.delivery.mx import MXResolver, make_async_resolver
    from mailer.delivery.shaping import Shaper

    if loop == "uvloop":
        import uvloop

        uvloop.install()
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_port
    resolver.timeout = resolver.lifetime = 5.0
    domains = max(1, sessions // PER_DOMAIN)
    count = Count()
    cpu, started = _cpu(), time.monotonic()
    stats = deliver_direct(
        _items(messages, domains),
        settings=DirectSettings(port=port, helo="bench.test", max_sessions=sessions, timeout=60.0),
        listener=count,
        resolver=MXResolver(make_async_resolver(resolver), rng=random.Random(1)),
        shaper=Shaper(connections_per_domain=PER_DOMAIN),
    )
    elapsed, cpu = time.monotonic() - started, _cpu() - cpu
    return {"sent": stats.sent, "elapsed": elapsed, "cpu": cpu, "peak_sessions": stats.peak_sessions}


def one_case(args: argparse.Namespace) -> None:
    """Child process: one engine, one session count; prints one JSON line."""
    if args.engine == "threads":
        result = run_threads(args.port, args.case_sessions, args.messages)
    else:
        result = run_asyncio(args.port, args.case_sessions, args.messages, args.dns_port, args.engine)
    print(
        json.dumps(
            {
                "engine": args.engine,
                "sessions": args.case_sessions,
                "messages": args.messages,
                "sent": result["sent"],
                "msg_per_s": round(result["sent"] / result["elapsed"], 1),
                "cpu_s_per_1000": round(1000 * result["cpu"] / max(result["sent"], 1), 3),
                "peak_sessions": result["peak_sessions"],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--sessions", default="100,500,1000")
    parser.add_argument("--engines", default="threads,asyncio,uvloop")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--case-sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dns-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        one_case(args)
        return

    from dns_fixtures import DNSTestServer

    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, str(HERE.parent / "tests"), str(args.delay)], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    dns_server = DNSTestServer().start()
    sessions_list = [int(s) for s in args.sessions.split(",")]
    try:
        for i in range(max(sessions_list) // PER_DOMAIN):
            dns_server.add(f"d{i}.test", "MX", [f"10 mx.d{i}.test."])
            dns_server.add(f"mx.d{i}.test", "A", ["127.0.0.1"])
        print(f"# {' '.join(sys.argv)}  (sink: bdat_server, {args.delay * 1000:.0f} ms a reply group)", flush=True)
        for sessions in sessions_list:
            for engine in args.engines.split(","):
                load = os.getloadavg()[0]
                out = subprocess.run(
                    [sys.executable, __file__, "--engine", engine, "--case-sessions", str(sessions),
                     "--messages", str(args.messages), "--port", str(port), "--dns-port", str(dns_server.port)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps({"error": out.stderr})
                record = json.loads(line)
                record["load_average"] = round(load, 1)
                print(json.dumps(record), flush=True)
    finally:
        dns_server.stop()
        sink.kill()


if __name__ == "__main__":
    main()
