"""Open and click tracking at build time: a pure transform of one message's HTML part.

With ``[tracking] clicks`` every ``http(s)`` link of the HTML part becomes
``base_url/c/<click token>`` (the token carries campaign, recipient and the target URL,
so ``mailer serve`` redirects to that URL only); with ``opens`` one 1x1 image
``base_url/o/<open token>`` goes at the end of the body; ``utm`` parameters are added to
every tracked link (existing query strings are kept, a ``utm_*`` key the link already has
is not overridden). The text part is never touched: it keeps the readable URL.

Not rewritten: ``mailto:``, ``tel:`` and other non-web schemes, in-page anchors
(``#top``) and the unsubscribe link (a redirect in front of it would break one-click and
looks like phishing to filters).

The HTML comes from our renderer, where CSV values are escaped, so a value can never
open a tag or an attribute: this transform only looks at ``href`` attributes of ``<a>``
tags and re-escapes every URL it writes. It runs per message, so it is one regular
expression pass with a per-run cache of the UTM-extended URLs.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..core.config import Config
from ..core.errors import ConfigError

__all__ = ["ClickSigner", "Tracker", "tracker_for"]


class ClickSigner(Protocol):
    """What tracking needs of :class:`mailer.core.tokens.TokenSigner`."""

    def open_token(self, campaign: str, address: str) -> str: ...

    def click_token(self, campaign: str, address: str, url: str) -> str: ...


# An <a ...> start tag and, inside it, its href attribute (quoted either way, or bare).
_ANCHOR = re.compile(r"<a\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


class Tracker:
    """Rewrites the HTML of one campaign's messages; build one per run.

    ``utm`` values are given already rendered (the config's Jinja, with ``campaign``,
    rendered once per run: a CSV value never reaches them).
    """

    def __init__(
        self,
        *,
        signer: ClickSigner,
        base_url: str,
        campaign: str,
        opens: bool,
        clicks: bool,
        utm: Mapping[str, str] | None = None,
    ) -> None:
        self._signer = signer
        self._base = base_url.rstrip("/")
        self._campaign = campaign
        self.opens = opens
        self.clicks = clicks
        self._utm = dict(utm or {})
        self._utm_cache: dict[str, str] = {}

    @property
    def active(self) -> bool:
        """Whether this tracker changes anything at all."""
        return self.opens or self.clicks or bool(self._utm)

    def with_utm(self, url: str) -> str:
        """``url`` with the UTM parameters it does not have yet (query and fragment kept)."""
        if not self._utm:
            return url
        cached = self._utm_cache.get(url)
        if cached is not None:
            return cached
        base, hash_mark, fragment = url.partition("#")
        _, _, query = base.partition("?")
        present = {key for key, _ in parse_qsl(query, keep_blank_values=True)}
        missing = [(key, value) for key, value in self._utm.items() if key not in present]
        result = url
        if missing:
            joiner = "" if base.endswith(("?", "&")) else ("&" if "?" in base else "?")
            result = base + joiner + urlencode(missing) + hash_mark + fragment
        if len(self._utm_cache) < 10_000:
            self._utm_cache[url] = result
        return result

    @staticmethod
    def _tracked(url: str, unsubscribe_url: str | None) -> bool:
        if unsubscribe_url is not None and url == unsubscribe_url:
            return False
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError:
            return False
        return scheme in ("http", "https")

    def apply(self, html_part: str, address: str, *, unsubscribe_url: str | None = None) -> str:
        """The HTML part of ``address``'s message with links rewritten and the pixel added
        (``unsubscribe_url``, this message's, is left as it is)."""
        if not self.active:
            return html_part

        def rewrite_href(match: re.Match[str]) -> str:
            raw = match.group(2) if match.group(2) is not None else match.group(3)
            if raw is None:
                raw = match.group(4)
            url = html.unescape(raw).strip()
            if not self._tracked(url, unsubscribe_url):
                return match.group(0)
            url = self.with_utm(url)
            if self.clicks:
                url = f"{self._base}/c/{self._signer.click_token(self._campaign, address, url)}"
            return f'{match.group(1)}"{html.escape(url, quote=True)}"'

        def rewrite_anchor(match: re.Match[str]) -> str:
            return _HREF.sub(rewrite_href, match.group(0), count=1)

        result = _ANCHOR.sub(rewrite_anchor, html_part) if (self.clicks or self._utm) else html_part
        if self.opens:
            token = self._signer.open_token(self._campaign, address)
            pixel = (
                f'<img src="{html.escape(self._base, quote=True)}/o/{html.escape(token, quote=True)}" '
                'width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0">'
            )
            ends = list(_BODY_END.finditer(result))
            if ends:
                cut = ends[-1].start()
                result = result[:cut] + pixel + result[cut:]
            else:
                result += pixel
        return result


def tracker_for(config: Config, campaign: str) -> Tracker | None:
    """The run's tracker from ``[tracking]`` and ``[web]``, or None when tracking is off.

    The signing key is read here (exit 2 naming the variable when it is unset), and the
    ``utm`` values rendered once with ``campaign`` in a sandbox (a broken one is exit 2
    naming its key)."""
    tracking = config.tracking
    if not (tracking.opens or tracking.clicks or tracking.utm):
        return None
    from jinja2 import TemplateError as JinjaError
    from jinja2 import Undefined
    from jinja2.sandbox import SandboxedEnvironment

    where = str(config.path or "mailer.toml")
    env = SandboxedEnvironment(autoescape=False, undefined=Undefined)
    utm: dict[str, str] = {}
    for key, source in tracking.utm:
        try:
            utm[key] = env.from_string(source).render(campaign=campaign)
        except JinjaError as exc:
            raise ConfigError(
                f"'tracking.utm.{key}' is not a valid template ({exc}).",
                path=where,
                key=f"tracking.utm.{key}",
                hint="Only {{ campaign }} is known there.",
            ) from None
    signer: ClickSigner = _NoTokens()
    base_url = ""
    if tracking.opens or tracking.clicks:
        web = config.web
        assert web is not None and web.base_url is not None  # checked when the config was loaded
        from ..core.tokens import TokenSigner

        signer = TokenSigner.from_environment(web.secret_env, web.previous_secret_envs)
        base_url = web.base_url
    return Tracker(
        signer=signer, base_url=base_url, campaign=campaign, opens=tracking.opens, clicks=tracking.clicks, utm=utm
    )


class _NoTokens:
    """The signer of a tracker that only adds UTM parameters (never asked for a token)."""

    def open_token(self, campaign: str, address: str) -> str:
        raise AssertionError("opens are off")

    def click_token(self, campaign: str, address: str, url: str) -> str:
        raise AssertionError("clicks are off")
