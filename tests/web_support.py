"""What the web tests share: a real `mailer serve` process on a free loopback port, the
app under a real uvicorn server in a thread, and the flags that keep headless chromium
on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from send_support import Project

# Nothing may leave loopback: no first-run, sync, component or QUIC traffic of chromium's own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_flags(profile: Path, *extra: str) -> list[str]:
    """The loopback-only flags, a throwaway profile, and ``extra``."""
    return [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra]


@contextmanager
def serving(project: Project, env: dict[str, str], *, timeout: float = 30) -> Iterator[str]:
    """A `mailer serve --listen 127.0.0.1:0` of ``project``; yields its base URL once it listens."""
    process = project.spawn("serve", "--listen", "127.0.0.1:0", env=env)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
            if process.poll() is not None:
                raise AssertionError(f"mailer serve ended: {line}{process.stderr.read()}")
        else:
            raise AssertionError("mailer serve did not start")
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        for stream in (process.stdout, process.stderr):
            stream.close()


@contextmanager
def app_server(app: Any) -> Iterator[str]:
    """``app`` under a real uvicorn server in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
