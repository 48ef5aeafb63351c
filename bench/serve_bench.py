#!/usr/bin/env python3
"""`mailer serve` under load: one-click unsubscribe POSTs per second and their latency.

    python bench/serve_bench.py --contacts 100000 --tokens 50000 --clients 50 --seconds 20
    python bench/serve_bench.py --store postgres ...      # the send log in a PostgreSQL 15 cluster

What runs, each in a process of its own:
- `mailer serve` on a free loopback port, over the project's send log;
- `mailer send` of the same campaign (--contacts marketing messages with the
  one-click header) into Postfix's smtp-sink, started just before the load;
- wrk (C, one thread, 50 connections; bench/serve_post.lua) POSTing
  `List-Unsubscribe=One-Click` as Gmail and Yahoo send it, each request with the next
  of --tokens distinct signed tokens of contacts of that campaign.

wrk is the load generator because it is an event loop in C: on a 2-core machine a
Python client would take a large share of the CPU the server needs and measure itself.

After the load the bench checks what it can without trusting the server: every answer
was 200 (wrk counts any other status and every socket error), and every address whose
token was POSTed is in the suppression list with reason `unsubscribe`, read from the
store once both processes have exited. It prints one JSON object. A measuring tool,
not a test: it asserts nothing, and the machine's load average is printed beside the
figures because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BenchCluster, free_port, mailer_command, start_sink, write_contacts

SECRET = "bench-" + "k" * 40
LUA = Path(__file__).resolve().parent / "serve_post.lua"

CONFIG = """[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
timeout = 30

[send]
rate = "{send_rate}"
connections = 8
max_per_connection = 1000
retries = 3
retry_backoff = 0.5

[message]
from = "Acme News <news@acme.example>"
kind = "marketing"

[web]
base_url = "http://127.0.0.1:8025"

[log]
{log}
"""

TEMPLATE = "Subject: News for {{ first_name }}\n\nHello {{ first_name }}, leave here: {{ unsubscribe_url }}\n"


def wait_listening(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise SystemExit(f"mailer serve ended: {line}{process.stderr.read()}")
    raise SystemExit("mailer serve did not start within 60 s")


def run_wrk(base: str, tokens: Path, *, clients: int, seconds: int, threads: int) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    done = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{clients}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            base,
            "--",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"^RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if not found:
        raise SystemExit(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    return json.loads(found.group(1))


def suppressed_count(work: Path, url: str | None, addresses: list[str]) -> tuple[int, int, list[int]]:
    """(how many of ``addresses`` are suppressed with reason unsubscribe, all suppressions,
    the positions of the first ten that are not)."""
    from mailer.core.config import LogConfig
    from mailer.store import open_store

    wanted = {address.casefold() for address in addresses}
    log = LogConfig(path=work / "bench.sqlite3", url=url) if url else LogConfig(path=work / "bench.sqlite3")
    with open_store(log) as store:
        entries = list(store.list_suppressions())
    done = {entry.address.casefold() for entry in entries if entry.reason == "unsubscribe"}
    found = len(wanted & done)
    missing = [index for index, address in enumerate(addresses) if address.casefold() not in done][:10]
    return found, len(entries), missing


def bench_serve(args: argparse.Namespace) -> dict:
    from mailer.core.tokens import TokenSigner

    cluster = BenchCluster() if args.store == "postgres" else None
    url = cluster.new_database() if cluster else None
    port = free_port()
    sink, sink_used = start_sink("smtp-sink", port)
    serve = send = None
    try:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            write_contacts(work / "contacts.csv", args.contacts)
            (work / "news.txt.j2").write_text(TEMPLATE, encoding="utf-8")
            log = f'url = "{url}"' if url else 'path = "bench.sqlite3"'
            (work / "mailer.toml").write_text(
                CONFIG.format(port=port, log=log, send_rate=args.send_rate), encoding="utf-8"
            )
            signer = TokenSigner(SECRET)
            # Every other contact, so the tokens are spread over the list the send works through.
            addresses = [f"user{i}@example{i % 5000}.com" for i in range(0, args.contacts, 2)][: args.tokens]
            tokens = work / "tokens.txt"
            tokens.write_text("".join(signer.unsubscribe_token("bench", a) + "\n" for a in addresses))
            env = {**os.environ, "MAILER_WEB_SECRET": SECRET}
            command = mailer_command()
            serve = subprocess.Popen(
                command + ["serve", "--listen", "127.0.0.1:0", "--config", "mailer.toml"],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            base = wait_listening(serve)
            send_started = time.monotonic()
            send = subprocess.Popen(
                command + ["send", "contacts.csv", "news.txt.j2", "--campaign", "bench", "--yes", "--quiet", "--json",
                           "--config", "mailer.toml"],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(args.warmup)
            load_before = os.getloadavg()
            load_started = time.monotonic()
            wrk = run_wrk(base, tokens, clients=args.clients, seconds=args.seconds, threads=args.threads)
            load_ended = time.monotonic()
            load_after = os.getloadavg()
            send_running_at_end = send.poll() is None
            send_out, send_err = send.communicate(timeout=1800)
            send_seconds = time.monotonic() - send_started
            serve.terminate()
            serve.wait(timeout=30)
            serve_errors = serve.stderr.read()
            summary = json.loads(send_out) if send_out.strip().startswith("{") else {"stderr": send_err[-500:]}
            # Tokens go out in order, at most --clients at a time: every token before the
            # last --clients of those answered was answered (200, or counted as an error).
            # wrk calls request() once on its own to check the script and never sends that
            # one: the first token is skipped.
            posted = addresses[1 : max(1, min(len(addresses), wrk["requests"] - args.clients + 1))]
            found, total, missing = suppressed_count(work, url, posted)
            return {
                "store": args.store,
                "clients": args.clients,
                "wrk_threads": args.threads,
                "seconds": round(load_ended - load_started, 1),
                "requests": wrk["requests"],
                "requests_per_second": round(wrk["requests"] / (wrk["duration_us"] / 1e6)),
                "latency_ms": {k: round(v / 1000, 1) for k, v in wrk["latency_us"].items()},
                "errors": wrk["errors"],
                "non_200": wrk["errors"]["status"],
                "distinct_tokens_surely_answered": len(posted),
                "suppressed_with_reason_unsubscribe": found,
                "suppressions_total": total,
                "positions_not_suppressed": missing,
                "send": {
                    "contacts": args.contacts,
                    "exit_code": send.returncode,
                    "seconds": round(send_seconds, 1),
                    "running_through_the_whole_load": send_running_at_end,
                    "counts": summary.get("counts", summary),
                },
                "serve_stderr": serve_errors[-1000:],
                "sink": sink_used,
                "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "cpus": os.cpu_count(),
                "command": f"python bench/serve_bench.py --store {args.store} --contacts {args.contacts} "
                f"--tokens {args.tokens} --clients {args.clients} --seconds {args.seconds} --send-rate {args.send_rate}",
            }
    finally:
        for process in (send, serve):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        sink.terminate()
        sink.wait()
        if cluster:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--contacts", type=int, default=100_000, help="size of the campaign being sent meanwhile")
    parser.add_argument("--tokens", type=int, default=50_000, help="distinct unsubscribe tokens POSTed in turn")
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (one keeps wrk off the server's core)")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument(
        "--send-rate",
        default="unlimited",
        help="[send] rate of the send running meanwhile (default unlimited: it takes what CPU it can)",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of sending before the load starts")
    print(json.dumps(bench_serve(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
