"""The second face of mailer: ``mailer serve``, the web endpoint that unsubscribes and tracks."""

from __future__ import annotations

__all__: list[str] = []
