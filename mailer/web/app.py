"""The ASGI application of ``mailer serve``: one-click unsubscribe, the open pixel, click redirects.

Routes (tokens: :mod:`mailer.core.tokens`):

- ``POST /u/<token>`` — RFC 8058 one-click (body ``List-Unsubscribe=One-Click``, what
  Gmail and Yahoo send) and the page's form: the address is suppressed (reason
  ``unsubscribe``, source ``web``) with an ``unsubscribed`` event; 200 with a short page.
- ``GET /u/<token>`` — a page with one button that POSTs; a GET never unsubscribes (link
  scanners and mail security gateways prefetch every GET).
- ``GET /o/<token>`` — a 1×1 GIF and an ``opened`` event, when opens are tracked.
- ``GET /c/<token>`` — a 302 to the URL signed inside the token, and nowhere else (no
  open redirect), with a ``clicked`` event, when clicks are tracked.
- ``GET /healthz`` — ``ok`` for the reverse proxy's health check.

A token that does not verify gets the same 404 page whatever was wrong, and changes
nothing. No page echoes anything from the request (no address either: whoever holds a
link may not be its recipient). Writes go through the :class:`SendStore` in a worker
thread, so the event loop keeps answering while SQLite commits.

Writes are group-committed: one writer task takes every event waiting, writes them in
one ``record_feedback`` transaction, and only then answers each of their requests (200
means the suppression is committed; a failed commit answers all of them 503). While one
commit runs the next requests gather, so under load a commit carries many of them, and
the send's transactions meet one writer instead of one per worker thread. Measured
(bench/serve_bench.py, 50 clients, a send running, 2 loaded cores): 879 POSTs/s with one
transaction per request, 873/s grouped: the server is CPU-bound there, not commit-bound
(README, Performance).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ..core.tokens import TokenKind, TokenSigner
from ..store.base import SendStore
from ..store.records import FeedbackEvent, FeedbackKind

__all__ = ["PIXEL_GIF", "create_app"]

#: The smallest transparent 1×1 GIF (GIF89a, one transparent pixel).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
# A one-click body is 26 bytes; the page's form posts a few more. Nothing needs more.
_MAX_BODY = 4096

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
body {{ font: 1.125rem/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f6f6f4; color: #1a1a1a; }}
main {{ max-width: 32rem; margin: 12vh auto; padding: 1.5rem; background: #fff; border-radius: .5rem; }}
h1 {{ font-size: 1.5rem; margin-top: 0; }}
button {{ font: inherit; padding: .75rem 1.5rem; min-height: 48px; border: 0; border-radius: .375rem;
         background: #1d4ed8; color: #fff; cursor: pointer; }}
button:focus-visible {{ outline: 3px solid #f59e0b; outline-offset: 2px; }}
@media (prefers-color-scheme: dark) {{ body {{ background: #111; color: #eee; }} main {{ background: #1e1e1e; }} }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"""

_CONFIRM = _PAGE.format(
    title="Unsubscribe",
    body='<p>Do you want to stop receiving these emails?</p>\n<form method="post">\n'
    '<input type="hidden" name="List-Unsubscribe" value="One-Click">\n'
    '<button type="submit">Unsubscribe</button>\n</form>',
)
_DONE = _PAGE.format(title="You are unsubscribed", body="<p>You will not receive these emails any more.</p>")
_NOT_FOUND = _PAGE.format(title="Link not valid", body="<p>This link is not valid. Nothing was changed.</p>")
_FAILED = _PAGE.format(
    title="Please try again", body="<p>Something went wrong on our side. Nothing was lost; please try again later.</p>"
)


def _html(page: str, status: int = 200) -> Response:
    return Response(page, status_code=status, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)


def _not_found() -> Response:
    return _html(_NOT_FOUND, 404)


class _GroupWriter:
    """The single writer of an app: requests queue their event and await its commit."""

    def __init__(self, store: SendStore, *, max_batch: int = 1000) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[FeedbackEvent, list[tuple[str, str | None, str]], asyncio.Future[None]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def write(self, event: FeedbackEvent, suppress: list[tuple[str, str | None, str]]) -> None:
        """Return once ``event`` and ``suppress`` are committed; raise the store's error if not."""
        if self._task is None or self._task.done():
            # Started in the server's loop by the first write (the app runs with lifespan off).
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wakeup is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, suppress, done))
        self._wakeup.set()
        await done

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                events = [event for event, _, _ in batch]
                suppress = [entry for _, entries, _ in batch for entry in entries]
                try:
                    await run_in_threadpool(self._store.record_feedback, events, suppress=suppress)
                except Exception as exc:
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, _, done in batch:
                        if not done.done():
                            done.set_result(None)


def create_app(
    store: SendStore,
    signer: TokenSigner,
    *,
    opens: bool = False,
    clicks: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The application over ``store``, verifying tokens with ``signer``.

    ``opens`` and ``clicks`` enable ``/o/`` and ``/c/`` (off: they answer 404, as a
    forged token would). ``on_error`` is told of a store error (the response is a 503
    page that reveals nothing)."""
    writer = _GroupWriter(store)

    async def write(event: FeedbackEvent, suppress: list[tuple[str, str | None, str]]) -> Response | None:
        try:
            await writer.write(event, suppress)
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            return _html(_FAILED, 503)
        return None

    async def unsubscribe_page(request: Request) -> Response:
        if signer.verify(request.path_params["token"], TokenKind.UNSUBSCRIBE) is None:
            return _not_found()
        return _html(_CONFIRM)

    async def unsubscribe(request: Request) -> Response:
        claims = signer.verify(request.path_params["token"], TokenKind.UNSUBSCRIBE)
        if claims is None:
            return _not_found()
        # The body does not decide anything (the token does), but it is read, within
        # a limit, so that the connection stays usable for the next request.
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > _MAX_BODY:
                return PlainTextResponse("Request body too large.", 413, headers=_SECURITY_HEADERS)
        failed = await write(
            FeedbackEvent(claims.campaign, claims.address, FeedbackKind.UNSUBSCRIBED, source="web"),
            [(claims.address, "unsubscribe", "web")],
        )
        return failed or _html(_DONE)

    async def pixel(request: Request) -> Response:
        claims = signer.verify(request.path_params["token"], TokenKind.OPEN) if opens else None
        if claims is None:
            return _not_found()
        failed = await write(FeedbackEvent(claims.campaign, claims.address, FeedbackKind.OPENED, source="web"), [])
        headers = dict(_SECURITY_HEADERS, **{"Cross-Origin-Resource-Policy": "cross-origin"})
        if failed is not None:
            return failed
        return Response(PIXEL_GIF, media_type="image/gif", headers=headers)

    async def click(request: Request) -> Response:
        claims = signer.verify(request.path_params["token"], TokenKind.CLICK) if clicks else None
        if claims is None or claims.url is None or not _is_web_url(claims.url):
            return _not_found()
        # A lost click event is better than a reader stuck on an error page.
        await write(
            FeedbackEvent(claims.campaign, claims.address, FeedbackKind.CLICKED, detail=claims.url, source="web"), []
        )
        return RedirectResponse(claims.url, status_code=302, headers=_SECURITY_HEADERS)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok", headers=_SECURITY_HEADERS)

    async def not_found(request: Request, exc: Any) -> Response:
        return _not_found()

    async def method_not_allowed(request: Request, exc: Any) -> Response:
        return _html(_NOT_FOUND, 405)

    handlers: dict[Any, Callable[[Request, Any], Awaitable[Response]]] = {404: not_found, 405: method_not_allowed}
    return Starlette(
        routes=[
            Route("/u/{token}", unsubscribe_page, methods=["GET"]),
            Route("/u/{token}", unsubscribe, methods=["POST"]),
            Route("/o/{token}", pixel, methods=["GET"]),
            Route("/c/{token}", click, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers=handlers,
    )


def _is_web_url(url: str) -> bool:
    # Only http(s) with a host: a signed "javascript:" or "data:" link is never followed.
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc) and not any(c in url for c in "\r\n")
