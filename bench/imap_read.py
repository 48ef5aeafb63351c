#!/usr/bin/env python3
"""How fast the IMAP bounce source reads a mailbox, and with how much memory.

    python bench/imap_read.py --messages 20000 [--size 4000] [--batch 100] [--tls]

Fills tests/imap_server.py (a loopback IMAP server in this process) with N messages of
about SIZE bytes, then reads them all through mailer.bounces.imap in a child process
(imapclient, batches of --batch) and prints wall time, messages per second and the
child's peak RSS (VmHWM). The server shares the machine (and its Python GIL is in
this process, not the child's), so the figure is a floor for a real server's. This is a
measuring tool, not a test: it asserts nothing.
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

from imap_server import IMAPTestServer  # noqa: E402

CHILD = r"""
import json, ssl, sys, time
from mailer.bounces.imap import open_imap_source
url, batch, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=cafile) if cafile else None
start = time.perf_counter()
count = size = 0
with open_imap_source(url, password="bench", batch_size=batch, ssl_context=context) as source:
    for message in source:
        count += 1
        size += len(message.raw)
elapsed = time.perf_counter() - start
# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's pages
# (this process' parent holds the whole mailbox), VmHWM belongs to the new image.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"messages": count, "bytes": size, "seconds": elapsed, "peak_rss_kb": peak}))
"""


def make_tls_files(folder: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from types import SimpleNamespace

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    (folder / "server.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=bench CA", "-days", "1")
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "server.cnf",
    )  # fmt: skip
    return SimpleNamespace(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=4000, help="bytes of filler per message (a DSN is 2-10 kB)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--tls", action="store_true", help="implicit TLS (imaps://) with a throwaway CA")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tls = make_tls_files(Path(folder)) if options.tls else None
        server = IMAPTestServer(username="bench", password="bench", implicit_tls=options.tls, tls_files=tls)
        filler = b"x" * 76 + b"\r\n"
        body = filler * max(1, options.size // len(filler))
        for number in range(options.messages):
            server.add_message(b"Subject: bounce %d\r\nMessage-ID: <%d@bench>\r\n\r\n%s" % (number, number, body))
        scheme = "imaps" if options.tls else "imap"
        url = f"{scheme}://bench@127.0.0.1:{server.port}/INBOX"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, url, str(options.batch), str(tls.ca) if tls else ""],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        wall = time.perf_counter() - started
        server.stop()
    if done.returncode != 0:
        sys.exit(done.stderr)
    result = json.loads(done.stdout)
    rate = result["messages"] / result["seconds"]
    print(
        f"{result['messages']} messages ({result['bytes'] / 1e6:.1f} MB), batch {options.batch}, "
        f"{'imaps' if options.tls else 'imap (loopback, clear)'}: {result['seconds']:.2f} s reading "
        f"({wall:.2f} s with start-up), {rate:,.0f} msg/s, peak RSS {result['peak_rss_kb'] / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
