#!/usr/bin/env python3
"""`mailer bounces` throughput: DSNs parsed and recorded per second, and peak memory.

    python bench/bounces_bench.py --messages 100000
    python bench/bounces_bench.py --messages 10000      # the same at a tenth, to see memory stay flat

Builds a send log with one sent message per address (real Message-IDs in the log, as
`mailer send` writes them), an mbox with one DSN per address (the shapes of
tests/bounce_fixtures.py: Postfix hard bounces, Gmail policy rejections, Exchange NDRs,
Postfix delay notices, in turn), then runs the real `mailer bounces MBOX --json` as a
child process and reports wall time, reports per second and the child's peak RSS
(ru_maxrss from wait4). A second run over the same mbox measures the duplicate path.
This is a measuring tool, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import bounce_fixtures as fx  # noqa: E402

from mailer.core.outcomes import Status  # noqa: E402
from mailer.store.sqlite import SendLog  # noqa: E402

CONFIG = """[smtp]
host = "127.0.0.1"
security = "none"

[log]
path = "bench.sqlite3"
"""


def build(folder: Path, count: int) -> Path:
    """The send log and the mbox; returns the mbox path."""
    log_path = folder / "bench.sqlite3"
    with SendLog.open(log_path) as log:
        for start in range(0, count, 2000):
            chunk = range(start, min(start + 2000, count))
            log.record_events(
                "bench",
                [
                    (f"user{n}@example{n % 500}.com", Status.SENDING, None, None, f"<{n}.bench@acme.example>", n + 1)
                    for n in chunk
                ],
            )
            log.record_events(
                "bench",
                [
                    (f"user{n}@example{n % 500}.com", Status.SENT, 250, "ok", f"<{n}.bench@acme.example>", None)
                    for n in chunk
                ],
            )
    mbox = folder / "bounces.mbox"
    envelope = "bounces@acme.example"
    with mbox.open("wb") as out:
        for n in range(count):
            address = f"user{n}@example{n % 500}.com"
            message_id = f"<{n}.bench@acme.example>"
            kind = n % 4
            if kind == 0:
                raw = fx.postfix_dsn(address, message_id, envelope, report_id=f"<r{n}@mx1.acme.example>")
            elif kind == 1:
                raw = fx.gmail_dsn(address, message_id, envelope, status="5.7.26").replace(
                    b"Message-ID: <6745a1b2", f"Message-ID: <g{n}.6745a1b2".encode()
                )
            elif kind == 2:
                raw = fx.exchange_ndr(address, message_id, envelope).replace(
                    b"Message-ID: <b1c2d3e4", f"Message-ID: <x{n}.b1c2d3e4".encode()
                )
            else:
                raw = fx.postfix_delayed(address, message_id, envelope).replace(
                    b"Message-Id: <2026", f"Message-Id: <d{n}.2026".encode()
                )
            out.write(b"From MAILER-DAEMON Wed Dec  2 14:00:00 2026\n" + raw.replace(b"\nFrom ", b"\n>From ") + b"\n")
    (folder / "mailer.toml").write_text(CONFIG, encoding="utf-8")
    return mbox


def run(folder: Path, mbox: Path) -> tuple[float, int, dict[str, object]]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", "bounces", str(mbox), "--json", "-c", str(folder / "mailer.toml")],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stdout = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace"))
        raise SystemExit(f"mailer bounces exited {process.returncode}")
    return elapsed, usage.ru_maxrss, json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bounces-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        mbox = build(folder, args.messages)
        print(
            f"built {args.messages:,} DSNs ({mbox.stat().st_size / 1e6:.0f} MB mbox) and the send log "
            f"in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        for label in ("first read", "second read (all duplicates)"):
            elapsed, rss_kb, summary = run(folder, mbox)
            reports = int(summary["reports"])  # type: ignore[call-overload]
            print(
                f"{label}: {reports:,} reports in {elapsed:.1f} s = {reports / elapsed:,.0f} DSNs/s, "
                f"peak RSS {rss_kb / 1024:.0f} MB; hard {summary['hard']}, soft {summary['soft']}, "
                f"policy {summary['policy']}, duplicates {summary['duplicates']}, "
                f"unattributed {summary['unattributed']}, broken {summary['broken']}"
            )
        load = os.getloadavg()
        print(f"load average during the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
