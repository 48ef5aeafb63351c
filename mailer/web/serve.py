"""``mailer serve``: check the config, open the store, and run the ASGI app under uvicorn.

Everything that can be wrong is found before the port is opened: no ``[web]`` section,
the signing key's variable unset (exit 2 naming it), a bad ``--listen``. The store is
the one ``[log]`` names, so unsubscribes land where ``mailer send`` looks them up.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from urllib.parse import urlsplit

from ..core.config import Config
from ..core.errors import ConfigError, UsageError
from ..core.tokens import TokenSigner

__all__ = ["base_url_warning", "parse_listen", "serve"]

# Connections of the PostgreSQL pool of `mailer serve` (one per request being written).
_POOL_SIZE = 4


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as ``(host, port)``, or :class:`UsageError`."""
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(
            f"--listen must be HOST:PORT, for example 127.0.0.1:8025, not {text!r}.",
            hint="Listen on loopback and put a TLS reverse proxy (nginx, Caddy) in front: see README.",
        )
    return host, int(port)


def base_url_warning(base_url: str | None) -> str | None:
    """A warning for a plain-HTTP ``[web] base_url`` that is not on loopback, else None."""
    if base_url is None:
        return None
    parts = urlsplit(base_url)
    if parts.scheme.lower() == "https":
        return None
    host = parts.hostname or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"[web] base_url {base_url} is plain HTTP: mail providers ignore one-click unsubscribe "
        "that is not HTTPS (RFC 8058). Put a TLS reverse proxy in front and use an https:// URL."
    )


def serve(
    config: Config,
    *,
    listen: str | None = None,
    warn: Callable[[str], None] = lambda text: None,
    ready: Callable[[str, int], None] = lambda host, port: None,
) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM end it cleanly)."""
    if config.web is None:
        raise ConfigError(
            "`mailer serve` needs a [web] section in the config.",
            path=str(config.path) if config.path else None,
            key="web",
            hint='Add [web] with base_url = "https://mail.example.com" and export MAILER_WEB_SECRET.',
        )
    web = config.web
    host, port = parse_listen(listen or web.listen)
    signer = TokenSigner.from_environment(web.secret_env, web.previous_secret_envs, environ=os.environ)
    warning = base_url_warning(web.base_url)
    if warning:
        warn(warning)
    opens, clicks = config.tracking.opens, config.tracking.clicks

    import uvicorn

    from ..store import open_store
    from .app import create_app

    # Requests write from Starlette's worker threads: with PostgreSQL, a few pooled
    # connections let them commit at once (SQLite serialises its writers anyway).
    with open_store(config.log, pool_size=_POOL_SIZE) as store:
        app = create_app(store, signer, opens=opens, clicks=clicks, on_error=lambda exc: warn(f"store error: {exc}"))
        server_config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
        )
        server = uvicorn.Server(server_config)
        original_startup = server.startup

        async def startup(sockets: object = None) -> None:
            await original_startup(sockets=sockets)  # type: ignore[arg-type]
            for bound in server.servers:
                for sock in bound.sockets:
                    name = sock.getsockname()
                    ready(str(name[0]), int(name[1]))
                    return

        server.startup = startup  # type: ignore[method-assign]
        server.run()
