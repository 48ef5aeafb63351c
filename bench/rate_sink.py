#!/usr/bin/env python3
"""A loopback SMTP sink that accepts at most RATE messages a second (a relay's limit).

    python bench/rate_sink.py --port 2525 --rate 100 --out accepted.txt

Each message's final 250 waits for the sink's next slot (slots 1/RATE apart, shared by
all its connections), so however many connections a client opens, the sink accepts
RATE messages a second. Writes one line per accepted recipient, ``<monotonic time>
<address>``, to OUT when it gets SIGTERM; prints "ready" once it listens. A measuring
tool for bench/scaleout.py, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from aiosmtpd.controller import Controller


class RateLimitedHandler:
    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_slot = 0.0
        self.accepted: list[tuple[float, str]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        now = time.monotonic()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)
        at = time.monotonic()
        self.accepted.extend((at, address) for address in envelope.rcpt_tos)
        return "250 2.0.0 accepted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages a second at most")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    handler = RateLimitedHandler(args.rate)
    controller = Controller(handler, hostname="127.0.0.1", port=args.port)
    controller.start()
    print("ready", flush=True)
    stopped = False

    def stop(signum, frame) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    while not stopped:
        time.sleep(0.1)
    controller.stop()
    with open(args.out, "w", encoding="utf-8") as out:
        for at, address in handler.accepted:
            out.write(f"{at:.6f} {address}\n")


if __name__ == "__main__":
    main()
