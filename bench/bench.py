#!/usr/bin/env python3
"""mailer's benchmark: messages per second and peak memory of real runs.

    python bench/bench.py dry-run --contacts 100000 [--mailmerge]
    python bench/bench.py dry-run --contacts 1000000
    python bench/bench.py dry-run --contacts 20000 --dkim
    python bench/bench.py send --contacts 20000 [--sink smtp-sink|aiosmtpd] [--mailmerge] [--smtp-source]
    python bench/bench.py send --contacts 100000 --store sqlite,postgres --rounds 2
    python bench/bench.py rtt --delay 0.02 --messages 200
    python bench/bench.py dkim --key rsa|ed25519 --messages 2000
    python bench/bench.py check --contacts 100000 --domains 5000 --latency 0.02

Each run generates N contacts into a temporary folder, runs the installed `mailer`
command in a child process (output to /dev/null or into a loopback SMTP sink) and
reports wall time, messages per second and the child's peak RSS (ru_maxrss).
This is a measuring tool, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = """From: Acme News <news@acme.example>
To: {{ first_name }} {{ last_name }} <{{ email }}>
Subject: {{ first_name }}, your {{ plan }} plan renews on {{ renewal_date }}
Reply-To: support@acme.example

# Hello {{ first_name }},

Your **{{ plan }}** plan renews on {{ renewal_date }}. Nothing to do on your side:
we will charge the card ending in {{ card_last4 }}.

{% if plan == 'team' %}
Your team of {{ seats }} seats keeps all its settings.
{% endif %}

* Manage your plan: <https://acme.example/account>
* Questions? Reply to this mail.

Thanks for being with us since {{ since }}.

— The Acme team
"""

CONFIG = """[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
timeout = 30

[send]
rate = "unlimited"
connections = {connections}
max_per_connection = 1000
retries = 3
retry_backoff = 0.5

[message]
kind = "transactional"

[log]
path = "bench.sqlite3"
"""


def write_contacts(path: Path, count: int, *, domains: int = 5000) -> None:
    plans = ("free", "pro", "team")
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "First Name", "Last Name", "plan", "renewal_date", "card_last4", "seats", "since"])
        for i in range(count):
            writer.writerow(
                [
                    f"user{i}@example{i % domains}.com",
                    f"First{i}",
                    f"Lást{i}",
                    plans[i % 3],
                    "2027-01-01",
                    f"{i % 10000:04d}",
                    str(i % 50 + 1),
                    str(2015 + i % 10),
                ]
            )


def _tree_memory_kb(root: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and all its descendants, from /proc (Linux).

    RSS counts the pages that forked processes share once in each; PSS divides a
    shared page between the processes that share it, so it sums to what they use.
    """
    total = shared_fairly = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        shared_fairly += int(line.split()[1])
            with open(f"/proc/{pid}/task/{pid}/children") as children:
                stack.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return total, shared_fairly


PEAK_PSS: list[int] = []  # the last run_child's peak PSS in MB, for the modes that report it


def run_child(command: list[str], *, cwd: Path, stdout=subprocess.DEVNULL, accept=(0,)) -> tuple[float, int, int]:
    """Run a command; return (wall seconds, exit code, peak RSS in MB of it and its children).

    The memory of the whole process tree (mailer delivers, and signs, in child
    processes) is sampled every 50 ms; the figure is the largest sum seen. The peak
    PSS is left in ``PEAK_PSS``.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE)
    peak = peak_pss = 0
    while process.poll() is None:
        rss, pss = _tree_memory_kb(process.pid)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        time.sleep(0.05)
    PEAK_PSS[:] = [peak_pss // 1024]
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read()
    if process.returncode not in accept:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
        raise SystemExit(f"{command[0]} exited with {process.returncode}: no figure (see above)")
    return elapsed, process.returncode, peak // 1024


def mailer_command() -> list[str]:
    found = shutil.which("mailer")
    return [found] if found else [sys.executable, "-m", "mailer"]


def _write_history(path: Path, count: int) -> float:
    """A send log where every contact was sent one earlier campaign and a third opened it."""
    from datetime import UTC, datetime, timedelta

    from mailer.core.outcomes import Status
    from mailer.store.records import FeedbackEvent, FeedbackKind
    from mailer.store.sqlite import SendLog

    started = time.perf_counter()
    now = datetime.now(UTC)
    with SendLog.open(path) as log:
        for first in range(0, count, 20_000):
            rows = range(first, min(first + 20_000, count))
            emails = [f"user{i}@example{i % 5000}.com" for i in rows]
            log.record_events("earlier", [(e, Status.SENT, 250, "ok", f"<{e}>", None) for e in emails])
            log.record_feedback(
                FeedbackEvent("earlier", e, FeedbackKind.OPENED, at=(now - timedelta(days=i % 365)).isoformat())
                for i, e in zip(rows, emails, strict=True)
                if i % 3 == 0
            )
    return time.perf_counter() - started


def bench_dry_run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_contacts(work / "contacts.csv", args.contacts)
        (work / "bench.md.j2").write_text(TEMPLATE, encoding="utf-8")
        config = CONFIG.format(port=25, connections=4)
        if args.dkim:
            config += _dkim_config(work)
        (work / "mailer.toml").write_text(config, encoding="utf-8")
        command = mailer_command() + ["send", "contacts.csv", "bench.md.j2", "--dry-run", "--quiet"]
        if args.engagement:
            history_seconds = _write_history(work / "mailer.sqlite3", args.contacts)
            base = run_child(command, cwd=work)
            where = args.where
            elapsed, code, peak_mb = run_child([*command, "--where", where], cwd=work)
            return {
                "mode": "dry-run --where engagement",
                "contacts": args.contacts,
                "history_rows": args.contacts,
                "history_write_seconds": round(history_seconds, 1),
                "seconds_without_where": round(base[0], 2),
                "peak_rss_mb_without_where": base[2],
                "where": where,
                "seconds_with_engagement_where": round(elapsed, 2),
                "ratio": round(elapsed / base[0], 2),
                "exit_code": code,
                "peak_rss_mb": peak_mb,
                "command": f"python bench/bench.py dry-run --contacts {args.contacts} --engagement --where '{where}'",
            }
        elapsed, code, peak_mb = run_child(command, cwd=work)
        result = {
            "mode": "dry-run",
            "contacts": args.contacts,
            "exit_code": code,
            "seconds": round(elapsed, 2),
            "messages_per_second": round(args.contacts / elapsed),
            "peak_rss_mb": peak_mb,
            "peak_pss_mb": PEAK_PSS[0],
            "dkim": "rsa-2048" if args.dkim else None,
            "command": " ".join(["python", "bench/bench.py", "dry-run", "--contacts", str(args.contacts)])
            + (" --dkim" if args.dkim else "")
            + (" --mailmerge" if args.mailmerge else ""),
        }
        if args.mailmerge:
            # mailmerge's own dry run (renders and prints every message, sends nothing)
            # on the same contacts and Markdown body, its output to /dev/null too.
            result["mailmerge"] = bench_mailmerge(work, free_port(), args.contacts, dry_run=True)
            if result["mailmerge"].get("messages_per_second"):
                result["ratio"] = round(result["messages_per_second"] / result["mailmerge"]["messages_per_second"], 1)
    return result


def _make_key(key: Path, kind: str) -> None:
    if kind == "rsa":
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    else:
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True
        )


def _dkim_config(work: Path, kind: str = "rsa") -> str:
    """A fresh RSA-2048 (or Ed25519) key in ``work`` and the ``[dkim]`` section that names it."""
    key = work / "dkim.pem"
    _make_key(key, kind)
    key.chmod(0o600)
    return '\n[dkim]\ndomain = "acme.example"\nselector = "bench"\nprivate_key = "dkim.pem"\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_sink(kind: str, port: int, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if kind in ("auto", "smtp-sink") and sink:
        command = [sink]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        process = subprocess.Popen(command + [f"{host}:{port}", "1000"])
        used = "smtp-sink (Postfix)"
    else:
        if kind == "smtp-sink":
            raise SystemExit("smtp-sink not found: apt-get install postfix, or use --sink aiosmtpd")
        code = (
            "import asyncio, sys\n"
            "from aiosmtpd.controller import Controller\n"
            "class Sink:\n"
            "    async def handle_DATA(self, server, session, envelope):\n"
            "        return '250 OK'\n"
            f"c = Controller(Sink(), hostname='{host}', port={port}); c.start()\n"
            "import time\n"
            "while True: time.sleep(3600)\n"
        )
        process = subprocess.Popen([sys.executable, "-c", code])
        used = "aiosmtpd (Python)"
    for _ in range(100):
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, used


def _relays_config(ports: list[int], connections: int) -> str:
    """``--relays N``: one [relays.rK] per sink on 127.0.0.(K+1), equal weights, the
    connections split between them, and the stream that names them all."""
    each = max(1, connections // len(ports))
    text = ""
    for index, port in enumerate(ports, 2):
        text += (
            f'\n[relays.r{index}]\nhost = "127.0.0.{index}"\nport = {port}\nsecurity = "none"\n'
            f"timeout = 30\nconnections = {each}\n"
        )
    names = ", ".join(f'"r{index}"' for index in range(2, len(ports) + 2))
    return text + f"\n[streams.bench]\nrelays = [{names}]\n"


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class BenchCluster:
    """A throwaway PostgreSQL 15 cluster on a free loopback port, as tests/pg_fixtures.py
    makes one (as the postgres user when run as root), with the server's defaults but
    fsync off on both sides of the comparison's durability: SQLite's log runs with
    synchronous=NORMAL in WAL mode, so neither store waits for the disk per commit."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise SystemExit(f"{PG_BIN}/initdb not found: apt-get install postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="mailer-bench-pg-"))
        self.port = free_port()
        self.data = self.root / "data"
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "bench", "--auth", "trust",
                          "-E", "UTF8", "--locale", "C.UTF-8")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                          "-o", options, "-w", "start")  # fmt: skip
        self._databases = 0

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(command), check=True, capture_output=True)

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"bench{self._databases}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="bench", dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return f"postgresql://bench@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def bench_send(args: argparse.Namespace) -> dict:
    stores = [name.strip() for name in args.store.split(",")]
    if set(stores) - {"sqlite", "postgres"}:
        raise SystemExit("--store: sqlite, postgres, or both separated by a comma")
    if stores == ["sqlite"] and args.rounds == 1:
        return _bench_send_once(args, url=None)
    cluster = BenchCluster() if "postgres" in stores else None
    runs = []
    try:
        # Interleaved (sqlite, postgres, sqlite, postgres, ...) so that both see the same
        # share of the load the other engineers put on the machine.
        for round_number in range(args.rounds):
            for store in stores:
                load = os.getloadavg()[0]
                url = cluster.new_database() if store == "postgres" and cluster is not None else None
                result = _bench_send_once(args, url=url)
                result.update(store=store, round=round_number + 1, load_average_before=round(load, 2),
                              load_average_after=round(os.getloadavg()[0], 2))  # fmt: skip
                print(json.dumps(result, ensure_ascii=False), file=sys.stderr, flush=True)
                runs.append(result)
    finally:
        if cluster is not None:
            cluster.stop()
    summary: dict = {"mode": "send", "contacts": args.contacts, "stores": stores, "runs": runs,
                     "command": f"python bench/bench.py send --contacts {args.contacts} --store {args.store} "
                     f"--rounds {args.rounds}"}  # fmt: skip
    for store in stores:
        seconds = sorted(r["seconds"] for r in runs if r["store"] == store)
        summary[f"{store}_median_seconds"] = seconds[len(seconds) // 2]
    if len(stores) == 2:
        summary["postgres_over_sqlite"] = round(
            summary["postgres_median_seconds"] / summary["sqlite_median_seconds"], 2
        )
    return summary


def _bench_send_once(args: argparse.Namespace, *, url: str | None) -> dict:
    port = free_port()
    sink, used = start_sink(args.sink, port)
    relay_ports = [free_port() for _ in range(args.relays)] if args.relays > 1 else []
    relay_sinks = [start_sink(args.sink, p, host=f"127.0.0.{i}")[0] for i, p in enumerate(relay_ports, 2)]
    try:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            write_contacts(work / "contacts.csv", args.contacts)
            (work / "bench.md.j2").write_text(TEMPLATE, encoding="utf-8")
            config = CONFIG.format(port=port, connections=args.connections)
            if url is not None:
                config += f'url = "{url}"\n'
            if relay_ports:
                config += _relays_config(relay_ports, args.connections)
            if args.dkim:
                config += _dkim_config(work, args.key)
            (work / "mailer.toml").write_text(config, encoding="utf-8")
            command = mailer_command() + ["send", "contacts.csv", "bench.md.j2", "--yes", "--quiet", "--json"]
            if relay_ports:
                command += ["--stream", "bench"]
            if args.signing_workers is not None:
                os.environ["MAILER_DKIM_WORKERS"] = str(args.signing_workers)
            elapsed, code, peak_mb = run_child(command, cwd=work)
            result = {
                "mode": "send",
                "sink": used,
                "contacts": args.contacts,
                "connections": args.connections,
                "exit_code": code,
                "seconds": round(elapsed, 2),
                "messages_per_second": round(args.contacts / elapsed),
                "peak_rss_mb": peak_mb,
                "peak_pss_mb": PEAK_PSS[0],
                "dkim": ("rsa-2048" if args.key == "rsa" else "ed25519") if args.dkim else None,
                "signing_workers": args.signing_workers,
                "command": f"python bench/bench.py send --contacts {args.contacts} --connections {args.connections}"
                + (f" --dkim --key {args.key}" if args.dkim else "")
                + (f" --signing-workers {args.signing_workers}" if args.signing_workers is not None else "")
                + (" --smtp-source" if args.smtp_source else "")
                + (f" --relays {args.relays}" if relay_ports else ""),
                "relays": args.relays,
            }
            if args.smtp_source:
                result["smtp_source"] = bench_smtp_source(work, port, args.contacts, args.connections)
                if result["smtp_source"].get("messages_per_second"):
                    result["share_of_smtp_source"] = round(
                        result["messages_per_second"] / result["smtp_source"]["messages_per_second"], 2
                    )
            if args.mailmerge:
                result["mailmerge"] = bench_mailmerge(work, port, args.contacts)
                if result["mailmerge"].get("messages_per_second"):
                    result["ratio"] = round(
                        result["messages_per_second"] / result["mailmerge"]["messages_per_second"], 1
                    )
    finally:
        for process in [sink, *relay_sinks]:
            process.terminate()
            process.wait()
    return result


def bench_smtp_source(work: Path, port: int, count: int, sessions: int) -> dict:
    """Postfix's smtp-source into the same sink: ``sessions`` connections kept open
    (-d), messages of about the size mailer sends (the benchmark's messages are about
    1.9 KB: `bench.py dkim` prints it), one recipient each."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(source).exists():
        return {"tool": "smtp-source", "error": "not installed (apt-get install postfix)"}
    size = 1900
    command = [source, "-d", "-s", str(sessions), "-m", str(count), "-l", str(size)]
    command += ["-f", "news@acme.example", "-t", "user@example.com", f"127.0.0.1:{port}"]
    elapsed, code, _peak = run_child(command, cwd=work)
    return {
        "tool": "smtp-source (Postfix)",
        "sessions": sessions,
        "message_bytes": size,
        "exit_code": code,
        "seconds": round(elapsed, 2),
        "messages_per_second": round(count / elapsed),
    }


def bench_rtt(args: argparse.Namespace) -> dict:
    """Messages per second over one reused connection to a relay that waits ``--delay``
    before each group of replies (a network round trip), with DATA and with BDAT.

    The relay is tests/bdat_server.py in this process; mailer's delivery pool runs
    here too (one connection), so the figure is the transaction's, not rendering's.
    """
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from bdat_server import BDATServer

    from mailer.core.config import SendConfig, SMTPConfig
    from mailer.core.outcomes import Outgoing
    from mailer.delivery.pool import deliver

    class Quiet:
        thread_safe = True

        def on_sending(self, item: object, attempt: int) -> None:
            pass

        def on_result(self, item: object, result: object) -> None:
            pass

    body = (b"From: news@acme.example\r\nSubject: hello\r\n\r\n" + b"x" * 76 + b"\r\n") * 30
    result: dict = {
        "mode": "rtt",
        "delay_s": args.delay,
        "messages": args.messages,
        "connections": 1,
        "command": f"python bench/bench.py rtt --delay {args.delay} --messages {args.messages}",
    }
    for name, chunking in (("data", False), ("bdat", True)):
        server = BDATServer(chunking=chunking, delay=args.delay, record=False)
        try:
            items = [
                Outgoing(
                    key=i, sender="news@acme.example", recipients=[f"u{i}@example.com"], data=body, message_id=None
                )
                for i in range(args.messages)
            ]
            stats = deliver(
                items,
                smtp=SMTPConfig(host=server.host, port=server.port, security="none", timeout=30.0),
                send=SendConfig(rate="unlimited", connections=1, max_per_connection=100_000, retries=0),
                password=None,
                listener=Quiet(),
                stop=threading.Event(),
            )
        finally:
            server.stop()
        rate = stats.sent / stats.elapsed if stats.elapsed else 0.0
        result[name] = {
            "sent": stats.sent,
            "seconds": round(stats.elapsed, 2),
            "messages_per_second": round(rate, 1),
            "round_trips_per_message": round(1 / (rate * args.delay), 2) if rate and args.delay else None,
        }
    return result


def bench_mailmerge(work: Path, port: int, count: int, *, dry_run: bool = False) -> dict:
    """The same contacts through mailmerge 2.3.0 (its own venv; never a project dependency).

    ``dry_run``: mailmerge's ``--dry-run`` (render and print each message, send nothing).
    """
    venv = Path(tempfile.gettempdir()) / "mailer-bench-mailmerge-venv"
    binary = venv / "bin" / "mailmerge"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mailmerge==2.3.0"], check=True)
    # The same Markdown body; mailmerge sends text/markdown as multipart/alternative
    # (the Markdown text and its HTML rendering), like mailer's *.md.j2.
    body = TEMPLATE.split("\n\n", 1)[1]
    template = (
        "TO: {{email}}\n"
        "SUBJECT: {{first_name}}, your {{plan}} plan renews on {{renewal_date}}\n"
        "FROM: Acme News <news@acme.example>\n"
        "CONTENT-TYPE: text/markdown\n\n" + body
    )
    (work / "mm_template.txt").write_text(template, encoding="utf-8")
    with (
        (work / "contacts.csv").open(encoding="utf-8") as source,
        (work / "mm_database.csv").open("w", encoding="utf-8", newline="") as target,
    ):
        reader = csv.reader(source)
        writer = csv.writer(target)
        header = next(reader)
        writer.writerow(["email", "first_name", "last_name"] + header[3:])
        writer.writerows(reader)
    (work / "mm_server.conf").write_text(f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\n", encoding="utf-8")
    command = [
        str(binary),
        "--template",
        "mm_template.txt",
        "--database",
        "mm_database.csv",
        "--config",
        "mm_server.conf",
        "--dry-run" if dry_run else "--no-dry-run",
        "--no-limit",
        "--output-format",
        "raw",
    ]
    elapsed, code, peak_mb = run_child(command, cwd=work)
    return {
        "tool": "mailmerge 2.3.0" + (" --dry-run" if dry_run else ""),
        "exit_code": code,
        "seconds": round(elapsed, 2),
        "messages_per_second": round(count / elapsed) if code == 0 else None,
        "peak_rss_mb": peak_mb,
    }


DNS_SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from dns_fixtures import DNSTestServer
domains, latency = int(sys.argv[2]), float(sys.argv[3])
zone = {(f"example{i}.com", "MX"): [f"10 mx.example{i}.com."] for i in range(domains)}
zone[("acme.example", "MX")] = ["10 mx.acme.example."]
zone[("acme.example", "TXT")] = ['"v=spf1 ip4:127.0.0.1 -all"']
zone[("_dmarc.acme.example", "TXT")] = ['"v=DMARC1; p=none"']
server = DNSTestServer(zone)
server.latency = latency
server.start()
print(server.port, flush=True)
while True:
    time.sleep(3600)
"""


def bench_check(args: argparse.Namespace) -> dict:
    """`mailer check CONTACTS` against a loopback DNS server that answers after ``--latency`` seconds."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    dns_server = subprocess.Popen(
        [sys.executable, "-c", DNS_SERVER, str(tests), str(args.domains), str(args.latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = free_port()
    sink, _used = start_sink("auto", port)
    try:
        dns_port = int(dns_server.stdout.readline())
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            write_contacts(work / "contacts.csv", args.contacts, domains=args.domains)
            config = CONFIG.format(port=port, connections=4).replace(
                'kind = "transactional"', 'from = "news@acme.example"\nkind = "transactional"'
            )
            config += f'\n[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = 5\n'
            (work / "mailer.toml").write_text(config, encoding="utf-8")
            command = mailer_command() + ["check", "contacts.csv", "--json"]
            with (work / "check.json").open("wb") as output:
                elapsed, code, peak_mb = run_child(command, cwd=work, stdout=output, accept=(0, 1))
            report = json.loads((work / "check.json").read_text(encoding="utf-8"))
            checks = [
                f"{c['name']}: {c['status']}: {c['detail']}" for c in report["checks"] if c["section"] == "contacts"
            ]
    finally:
        dns_server.terminate()
        dns_server.wait()
        sink.terminate()
        sink.wait()
    return {
        "mode": "check",
        "contacts": args.contacts,
        "domains": args.domains,
        "dns_latency_s": args.latency,
        "exit_code": code,
        "seconds": round(elapsed, 2),
        "peak_rss_mb": peak_mb,
        "checks": checks,
        "command": f"python bench/bench.py check --contacts {args.contacts} --domains {args.domains} "
        f"--latency {args.latency}",
    }


def bench_dkim(args: argparse.Namespace) -> dict:
    """Signatures per second of DKIMSigner.sign on the benchmark's ~4 KB multipart message."""
    from mailer.compose.contacts import ContactReader
    from mailer.compose.message import MessageBuilder
    from mailer.compose.templates import load_template
    from mailer.core.config import DKIMConfig
    from mailer.dkim.signer import DKIMSigner

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key = work / "dkim.pem"
        _make_key(key, args.key)
        key.chmod(0o600)
        signer = DKIMSigner.load(DKIMConfig(domain="acme.example", selector="bench", private_key=key))
        write_contacts(work / "contacts.csv", 50)
        (work / "bench.md.j2").write_text(TEMPLATE, encoding="utf-8")
        template = load_template(work / "bench.md.j2")
        builder = MessageBuilder()
        messages = [
            builder.build(template.render(c.variables), contact=c).data
            for c in ContactReader(str(work / "contacts.csv"))
        ]
        assert signer._sign_digest is not None, signer.warnings
        start = time.perf_counter()
        for index in range(args.messages):
            signer.sign(messages[index % len(messages)])
        elapsed = time.perf_counter() - start
        # The same messages through dkimpy (the fallback and the tests' reference).
        reference_count = max(1, args.messages // 4)
        start = time.perf_counter()
        for index in range(reference_count):
            signer._sign_with_dkimpy(messages[index % len(messages)])
        reference = time.perf_counter() - start
    return {
        "mode": "dkim",
        "measures": "DKIMSigner.sign (mailer/dkim/relaxed.py + OpenSSL), one thread, in process; "
        "dkimpy_signatures_per_second: the same key and messages through dkimpy",
        "key": args.key,
        "messages": args.messages,
        "message_bytes": len(messages[0]),
        "seconds": round(elapsed, 2),
        "signatures_per_second": round(args.messages / elapsed),
        "dkimpy_signatures_per_second": round(reference_count / reference),
        "command": f"python bench/bench.py dkim --key {args.key} --messages {args.messages}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    dry = sub.add_parser("dry-run", help="render N messages into /dev/null")
    dry.add_argument("--contacts", type=int, default=100_000)
    dry.add_argument("--dkim", action="store_true", help="sign every message (RSA-2048 key made for the run)")
    dry.add_argument("--mailmerge", action="store_true", help="also run mailmerge 2.3.0's dry run on the same contacts")
    dry.add_argument(
        "--engagement",
        action="store_true",
        help="a send log with one earlier send per contact (a third opened); time the dry run without and with "
        "an engagement --where",
    )
    dry.add_argument(
        "--where",
        default="engagement.days_since_open is none or engagement.days_since_open < 180",
        help="the engagement --where of --engagement (the default drops about a sixth of the list; "
        "'engagement.sent >= 0' keeps everyone, for a like-for-like time)",
    )
    send = sub.add_parser("send", help="send N messages into a loopback sink")
    send.add_argument("--contacts", type=int, default=20_000)
    send.add_argument("--connections", type=int, default=4)
    send.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto")
    send.add_argument("--mailmerge", action="store_true", help="also run mailmerge 2.3.0 on the same contacts")
    send.add_argument("--dkim", action="store_true", help="sign every message (a key made for the run)")
    send.add_argument("--key", choices=("rsa", "ed25519"), default="rsa", help="with --dkim: RSA-2048 or Ed25519")
    send.add_argument("--signing-workers", type=int, help="DKIM signing processes (MAILER_DKIM_WORKERS)")
    send.add_argument(
        "--smtp-source", action="store_true", help="also run Postfix's smtp-source into the same sink (same sessions)"
    )
    send.add_argument(
        "--relays",
        type=int,
        default=1,
        help="a stream of N relays, one sink each on 127.0.0.2, 127.0.0.3, ... (the connections split between them)",
    )
    send.add_argument(
        "--store",
        default="sqlite",
        help="the send log: sqlite, postgres (a cluster on loopback started for the run), or sqlite,postgres "
        "(side by side, interleaved)",
    )
    send.add_argument("--rounds", type=int, default=1, help="with --store: runs of each store, interleaved")
    rtt = sub.add_parser("rtt", help="one reused connection to a relay that answers after a delay: DATA vs BDAT")
    rtt.add_argument("--delay", type=float, default=0.02, help="seconds before each group of replies")
    rtt.add_argument("--messages", type=int, default=200)
    dkim = sub.add_parser("dkim", help="DKIM signatures per second (one thread)")
    dkim.add_argument("--key", choices=("rsa", "ed25519"), default="rsa")
    dkim.add_argument("--messages", type=int, default=2000)
    check = sub.add_parser("check", help="mailer check CONTACTS against a loopback DNS server")
    check.add_argument("--contacts", type=int, default=100_000)
    check.add_argument("--domains", type=int, default=5000)
    check.add_argument("--latency", type=float, default=0.02, help="seconds before each DNS answer")
    args = parser.parse_args()
    modes = {"dry-run": bench_dry_run, "send": bench_send, "dkim": bench_dkim, "check": bench_check, "rtt": bench_rtt}
    result = modes[args.mode](args)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
