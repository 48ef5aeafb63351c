#!/usr/bin/env python3
"""Direct-delivery engine benchmark: N messages over D domains, every reply delayed.

    python bench/direct.py --messages 10000 --domains 500 --delay 0.1 --sessions 100,500

The loopback DNS responder (tests/dns_fixtures.py) gives each domain d<i>.test an MX
pointing at 127.0.0.1; one sink (tests/bdat_server.py, PIPELINING + CHUNKING, every
reply group written after --delay, as a network round trip) runs in a child process so
that it does not share the engine's interpreter. Reports msg/s, peak RSS of this
process (ru_maxrss) and the most sessions open at once. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from dns_fixtures import DNSTestServer  # noqa: E402

from mailer.core.outcomes import Outgoing  # noqa: E402
from mailer.delivery.direct import DirectSettings, deliver_direct  # noqa: E402
from mailer.delivery.mx import MXResolver, make_async_resolver  # noqa: E402
from mailer.delivery.shaping import Shaper  # noqa: E402

SINK = (
    "import sys,time; sys.path.insert(0, sys.argv[1]);"
    "from bdat_server import BDATServer;"
    "s = BDATServer(delay=float(sys.argv[2]), record=False); print(s.port, flush=True); time.sleep(1e9)"
)


class Count:
    def __init__(self) -> None:
        self.final = 0

    def on_sending(self, item, attempt) -> None:
        pass

    def on_result(self, item, result) -> None:
        self.final += result.final


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--domains", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--sessions", default="100,500")
    parser.add_argument("--per-domain", type=int, default=4)
    args = parser.parse_args()
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, str(HERE.parent / "tests"), str(args.delay)], stdout=subprocess.PIPE, text=True
    )
    port = int(sink.stdout.readline())
    dns = DNSTestServer().start()
    try:
        for i in range(args.domains):
            dns.add(f"d{i}.test", "MX", [f"10 mx.d{i}.test."])
            dns.add(f"mx.d{i}.test", "A", ["127.0.0.1"])
        body = b"Subject: bench\r\n\r\n" + b"x" * 1800 + b"\r\n"
        for sessions in [int(s) for s in args.sessions.split(",")]:
            items = (
                Outgoing(
                    key=n,
                    sender="b@sender.test",
                    recipients=[f"u{n}@d{n % args.domains}.test"],
                    data=b"To: u%d\r\n" % n + body,
                    message_id=str(n),
                )
                for n in range(args.messages)
            )
            count = Count()
            started = time.monotonic()
            stats = deliver_direct(
                items,
                settings=DirectSettings(port=port, helo="bench.test", max_sessions=sessions, timeout=60.0),
                listener=count,
                resolver=MXResolver(make_async_resolver(dns.config(timeout=5.0)), rng=random.Random(1)),
                shaper=Shaper(connections_per_domain=args.per_domain),
            )
            elapsed = time.monotonic() - started
            print(
                json.dumps(
                    {
                        "command": " ".join(sys.argv),
                        "max_sessions": sessions,
                        "messages": args.messages,
                        "domains": args.domains,
                        "delay_s": args.delay,
                        "sent": stats.sent,
                        "deferred": stats.deferred,
                        "msg_per_s": round(stats.sent / elapsed, 1),
                        "peak_sessions": stats.peak_sessions,
                        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        "load_average": [round(x, 1) for x in os.getloadavg()],
                    }
                ),
                flush=True,
            )
    finally:
        dns.stop()
        sink.kill()


if __name__ == "__main__":
    main()
