#!/usr/bin/env python3
"""Scale-out simulation: N cooperating `mailer send` runs, each with its own rate-limited relay.

    python bench/scaleout.py --contacts 6000 --relay-rate 100 --runs 1 2 4

For each number of runs: a fresh database on a throwaway PostgreSQL cluster (started
like tests/pg_fixtures.py does, as the postgres user when run as root), one
bench/rate_sink.py per run accepting at most RELAY_RATE messages a second (a relay's
limit), one folder per run (a "host": its own mailer.toml pointing at its own sink, its
own [log] path, the same contacts file), and all the runs started at once. Reported:
the campaign's throughput as the sinks saw it (messages / time from the first to the
last accepted), the ideal (runs x relay rate), each run's own count, and whether every
recipient was accepted exactly once. A measuring tool, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import TEMPLATE, free_port, mailer_command, write_contacts  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "bench-secret-not-a-real-one"
USER = "mailer_bench"


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


def start_cluster(root: Path) -> tuple[int, Path]:
    """A throwaway PostgreSQL 15 cluster on a free loopback port; returns (port, data dir)."""
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile),
                     "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8"),
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=60"
    subprocess.run(
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"),
        check=True,
        capture_output=True,
    )
    return port, data


def stop_cluster(data: Path) -> None:
    subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
                   capture_output=True)  # fmt: skip


def admin(port: int, sql: str) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres",
                         autocommit=True) as conn:  # fmt: skip
        conn.execute(sql)  # type: ignore[arg-type]


def host_config(sink_port: int, url: str | None, connections: int) -> str:
    url_line = f'url = "{url}"\n' if url else ""
    return f"""[smtp]
host = "127.0.0.1"
port = {sink_port}
security = "none"
timeout = 30

[send]
rate = "unlimited"
connections = {connections}
max_per_connection = 1000

[message]
kind = "transactional"

[log]
{url_line}path = "mailer.sqlite3"
"""


def simulate(
    work: Path, port: int, contacts: Path, *, runs: int, relay_rate: float, connections: int, sqlite: bool = False
) -> dict:
    database = f"scale{runs}_{int(time.time())}"
    admin(port, f"CREATE DATABASE {database}")
    url = None if sqlite else f"postgresql://{USER}@127.0.0.1:{port}/{database}"
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    sinks, folders, outs = [], [], []
    try:
        for index in range(runs):
            folder = work / f"n{runs}{'-sqlite' if sqlite else ''}" / f"host{index}"
            folder.mkdir(parents=True)
            sink_port = free_port()
            out = folder / "accepted.txt"
            sink = subprocess.Popen(
                [sys.executable, str(HERE / "rate_sink.py"), "--port", str(sink_port), "--rate", str(relay_rate),
                 "--out", str(out)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            sinks.append(sink)
            outs.append(out)
            shutil.copy(contacts, folder / "contacts.csv")
            (folder / "news.md.j2").write_text(TEMPLATE, encoding="utf-8")
            (folder / "mailer.toml").write_text(host_config(sink_port, url, connections), encoding="utf-8")
            folders.append(folder)
        started = time.perf_counter()
        command = [*mailer_command(), "send", "contacts.csv", "news.md.j2", "--campaign", "scale", "--yes", "--json",
                   "--quiet", "--config", "mailer.toml"]  # fmt: skip
        processes = [
            subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for folder in folders
        ]
        results = []
        for process in processes:
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                sys.stderr.write(stderr[-2000:])
            results.append(json.loads(stdout) if stdout.strip() else {"counts": {}})
        wall = time.perf_counter() - started
    finally:
        for sink in sinks:
            sink.terminate()
        for sink in sinks:
            sink.wait()
    accepted: list[tuple[float, str]] = []
    for out in outs:
        for line in out.read_text(encoding="utf-8").splitlines():
            at, address = line.split(" ", 1)
            accepted.append((float(at), address))
    times = sorted(at for at, _ in accepted)
    counts = Counter(address for _, address in accepted)
    throughput = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {
        "store": "sqlite" if sqlite else "postgresql",
        "runs": runs,
        "relay_rate": relay_rate,
        "ideal": runs * relay_rate,
        "accepted": len(accepted),
        "distinct": len(counts),
        "twice_or_more": sum(1 for count in counts.values() if count > 1),
        "throughput": round(throughput, 1),
        "wall_seconds": round(wall, 1),
        "sent_by_run": [result["counts"].get("sent", 0) for result in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contacts", type=int, default=6000)
    parser.add_argument("--relay-rate", type=float, default=100.0, help="messages a second each relay accepts")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--connections", type=int, default=4, help="SMTP connections per run")
    parser.add_argument("--sqlite", action="store_true", help="first one run with the SQLite log, for comparison")
    args = parser.parse_args()
    if not (PG_BIN / "initdb").exists():
        raise SystemExit(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing)")
    work = Path(tempfile.mkdtemp(prefix="mailer-scale-"))
    pg_root = Path(tempfile.mkdtemp(prefix="mailer-scale-pg-"))  # its own: the postgres user must reach it
    port, data = start_cluster(pg_root)
    try:
        contacts = work / "contacts.csv"
        write_contacts(contacts, args.contacts)
        print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
        if args.sqlite:
            figures = simulate(work, port, contacts, runs=1, relay_rate=args.relay_rate,
                               connections=args.connections, sqlite=True)  # fmt: skip
            figures["load_average"] = round(os.getloadavg()[0], 1)
            print(json.dumps(figures), flush=True)
        for runs in args.runs:
            figures = simulate(work, port, contacts, runs=runs, relay_rate=args.relay_rate,
                               connections=args.connections)  # fmt: skip
            figures["load_average"] = round(os.getloadavg()[0], 1)
            print(json.dumps(figures), flush=True)
    finally:
        stop_cluster(data)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)


if __name__ == "__main__":
    main()
