"""`mailer serve` on a PostgreSQL send log (its connection pool, mailer/store/postgres.py):
a real serve process, a real PostgreSQL 15 cluster, concurrent one-click unsubscribes,
and the server's connections killed between two requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from send_support import Project
from test_web import ENV, SECRET, request
from web_support import serving

from mailer.core.tokens import TokenSigner

ONE_CLICK = {"body": b"List-Unsubscribe=One-Click", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


@pytest.fixture
def served_pg(tmp_path, pg_url):
    project = Project(tmp_path, log={"url": pg_url})
    project.configure(web={"base_url": "https://mail.acme.example"})
    with serving(project, ENV) as base:
        yield pg_url, base


def unsubscribe(base: str, address: str) -> int:
    token = TokenSigner(SECRET).unsubscribe_token("spring", address)
    status, _, _ = request(f"{base}/u/{token}", method="POST", **ONE_CLICK)
    return status


def suppressed(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {address for (address,) in conn.execute("SELECT address FROM suppressions").fetchall()}


def test_concurrent_unsubscribes_all_land_through_the_pool(served_pg):
    url, base = served_pg
    emails = [f"reader{i}@example.com" for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as threads:
        statuses = list(threads.map(lambda address: unsubscribe(base, address), emails))
    assert statuses == [200] * len(emails)
    assert suppressed(url) == set(emails)
    with psycopg.connect(url) as conn:
        (opened,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mailer' AND datname = current_database()"
        ).fetchone()
    assert 1 <= opened <= 4  # the pool's bound


def test_serve_keeps_answering_after_the_database_dropped_its_connections(served_pg):
    url, base = served_pg
    assert unsubscribe(base, "first@example.com") == 200
    with psycopg.connect(url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'mailer' AND datname = current_database()"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    # One connection would stay dead (every later request a 503 until serve is restarted);
    # the pool finds the dropped one and connects anew.
    assert unsubscribe(base, "second@example.com") == 200
    assert suppressed(url) == {"first@example.com", "second@example.com"}
