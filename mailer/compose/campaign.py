"""The pipeline: contacts -> select -> render -> build (-> sign -> deliver -> log).

Data flows one way. :class:`Campaign` does every check that can fail before anything
is produced (template syntax, unknown variables, config, CSV header) and then yields
built messages lazily, so that a consumer (the dry-run writer or the delivery
engine) pulls them one at a time and memory stays flat. :class:`Summary` is what a
run did, counted by outcome.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jinja2 import Environment, TemplateSyntaxError, UndefinedError, meta

from ..core.addresses import address_key
from ..core.config import Config, MessageConfig, WebConfig
from ..core.errors import ConfigError, ExitCode, MailerError, RowError, TemplateError, UsageError
from ..core.outcomes import Skip
from ..core.tokens import TokenSigner
from .contacts import Contact, ContactReader, Rejected, compile_where
from .engagement import load_engagement, mentions_engagement
from .message import BuiltMessage, MessageBuilder
from .sandbox import RenderBudget, Sandbox, find_unsafe_attribute
from .seen import SeenAddresses
from .templates import BUILTIN_VARIABLES, RenderAbort, ValueTemplate, load_template
from .tracking import tracker_for

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 2919 §2: [phrase] "<" list-label "." list-id-namespace ">", all ASCII.
_LIST_ID = re.compile(rf"(?:[ -;=?-~]*\S )?<{_ATOM}(?:\.{_ATOM})+>")


def list_label(campaign: str) -> str:
    """The campaign's name as the label of its List-Id (RFC 2919 §2: a dot-atom)."""
    label = re.sub(r"[^a-z0-9.-]+", "-", campaign.lower())
    label = re.sub(r"\.{2,}", ".", label).strip(".-")[:64].strip(".-")
    return label or "list"


__all__ = [
    "PROBLEM_KINDS",
    "Campaign",
    "Problem",
    "Settle",
    "Summary",
    "default_campaign_name",
    "header_safe_url",
    "list_label",
    "unsubscribe_warning",
]

# RFC 3986's reserved and unreserved characters and %, less the comma (RFC 2369 lists
# URLs in List-Unsubscribe separated by commas); everything else is percent-encoded.
_URL_SAFE = ";/?:@&=+$-_.!~*'()#%[]"


def header_safe_url(url: str) -> str:
    """``url`` fit for ``List-Unsubscribe: <...>``: no non-ASCII (which RFC 2047 would
    encode, breaking one-click), no ``<``, ``>``, ``,``, spaces or quotes."""
    return urllib.parse.quote(url, safe=_URL_SAFE)


# Pairs each contact with why it is not mailed now (None: mail it); may look ahead.
Settle = Callable[[Iterator[Contact]], Iterable[tuple[Contact, Skip | None]]]

PROBLEM_KINDS = ("invalid", "fields", "duplicate", "blank", "error")
_PROBLEMS_KEPT = 100


def unsubscribe_warning(message: MessageConfig, web: WebConfig | None = None) -> tuple[str, str] | None:
    """``(what, how to fix it)`` for bulk mail without an unsubscribe, or None.

    The one rule behind the warning of ``send`` and the line of ``mailer check``.
    """
    if message.kind == "transactional" or message.list_unsubscribe or message.list_unsubscribe_mailto:
        return None
    if web is not None and web.base_url:
        return None
    return (
        "no unsubscribe is configured: Gmail, Yahoo and Outlook.com junk or reject bulk mail without "
        "one-click unsubscribe.",
        "Set [message] list_unsubscribe (an https URL) and/or list_unsubscribe_mailto; for transactional "
        'mail (receipts, password resets) set [message] kind = "transactional" instead.',
    )


def default_campaign_name(template: Path) -> str:
    """The template's file name without its extensions: ``welcome.md.j2`` -> ``welcome``."""
    return template.name.split(".")[0] or template.name


@dataclass(slots=True)
class Problem:
    """A row that was not mailed and why (line numbers are the CSV's)."""

    line: int
    kind: str  # invalid | fields | duplicate | blank | error (attachment, header injection, render)
    reason: str
    email: str = ""


@dataclass
class Summary:
    """What a run did: counts by outcome and the first problems, for humans and JSON."""

    campaign_name: str
    dry_run: bool
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    contacts: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    interrupted: bool = False
    # The error that ended a real send early, after it started (a process died, the
    # disk filled): the run still has counts, and its exit code says what they mean.
    stopped_by: str | None = None
    stopped_exit_code: ExitCode | None = None
    # The send log's server went away (PostgreSQL): the outcomes since are in the local journal only.
    stopped_by_lost_store: bool = False
    debug_traceback: str | None = None
    # A dry run's messages by destination domain, and what the stream's limits make of
    # them (mailer.send.estimate), for the summary.
    destinations: Counter[str] = field(default_factory=Counter)
    estimate: Any = None
    # A send through several relays: how many messages each one accepted.
    sent_by_relay: dict[str, int] | None = None

    def add_problem(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        if len(self.problems) < _PROBLEMS_KEPT:
            self.problems.append(problem)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def exit_code(self) -> ExitCode:
        """The documented exit code for this outcome."""
        if self.interrupted:
            return ExitCode.INTERRUPTED
        # An unknown outcome (a run killed mid-transaction) will not change by waiting,
        # so it is reported with the failures (1), not as "try again later" (75).
        bad = ("failed", "invalid", "fields", "error", "unknown")
        if self.stopped_by is not None:
            attempted = ("sent", "failed", "deferred", "unknown")
            if self.stopped_exit_code == ExitCode.USAGE and not any(self.counts[key] for key in attempted):
                return ExitCode.USAGE  # a relay refusing the login at once: nothing was sent
            # Something may have gone out: never "nothing was sent" (2). A re-run resumes,
            # so "try again later", unless some failed for good.
            for_good = ("failed", "invalid", "fields", "error")
            return ExitCode.PARTIAL if any(self.counts[key] for key in for_good) else ExitCode.TEMPFAIL
        if any(self.counts[key] for key in bad):
            return ExitCode.PARTIAL
        if self.counts["deferred"]:
            return ExitCode.TEMPFAIL
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "campaign": self.campaign_name,
            "dry_run": self.dry_run,
            "contacts": self.contacts,
            "counts": dict(sorted(self.counts.items())),
            "problems": [{"line": p.line, "kind": p.kind, "email": p.email, "reason": p.reason} for p in self.problems],
            "problems_not_listed": max(0, sum(self.counts[k] for k in PROBLEM_KINDS) - len(self.problems)),
            "elapsed_seconds": round(self.elapsed, 3),
            "interrupted": self.interrupted,
            "error": self.stopped_by,
            "exit_code": int(self.exit_code),
            **({"estimate": self.estimate.to_dict()} if self.estimate is not None else {}),
            **({"sent_by_relay": self.sent_by_relay} if self.sent_by_relay is not None else {}),
        }


class Campaign:
    """One run's inputs, loaded and validated; yields built messages on demand."""

    def __init__(
        self,
        *,
        contacts: str,
        template: Path,
        config: Config,
        name: str | None = None,
        where: str | None = None,
        limit: int | None = None,
        email_column: str | None = None,
        stdin: IO[bytes] | None = None,
        spool_stdin: bool = False,
        clock: Callable[[], float] = time.time,
        builder: MessageBuilder | None = None,
        return_path: str | None = None,
    ) -> None:
        """``return_path``: the stream's envelope sender (MAIL FROM) instead of the From
        address; ``{token}`` in it becomes each recipient's VERP token, signed with the
        key of ``[web] secret_env`` (exit 2 naming the variable when it is unset)."""
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 or more.")
        self.config = config
        self.name = name or default_campaign_name(template)
        if not re.fullmatch(r"[\w.@+-]{1,200}", self.name):
            raise UsageError(
                f"campaign name {self.name!r} may hold only letters, digits and . _ - @ +.",
                hint="Pass --campaign NAME.",
            )
        self.limit = limit
        self.email_column = email_column
        self.budget = RenderBudget(seconds=config.send.render_timeout, max_bytes=config.send.render_max_bytes)
        self.template = load_template(template, budget=self.budget)
        self.reader = ContactReader(contacts, email_column=email_column, stdin=stdin, spool_stdin=spool_stdin)
        self.where = compile_where(where, columns=self.reader.variable_names, budget=self.budget)
        self._engagement = load_engagement(config, clock=clock) if mentions_engagement(where) else None
        available = set(self.reader.variable_names) | set(BUILTIN_VARIABLES)
        message = config.message
        env = Sandbox(autoescape=False, max_size=self.budget.max_bytes)
        self._unsubscribe_url = None
        if message.list_unsubscribe:
            self._unsubscribe_url = self._compile_config_template(
                env, "message.list_unsubscribe", message.list_unsubscribe, available=available
            )
            available.add("unsubscribe_url")
        self._unsubscribe_mailto = message.list_unsubscribe_mailto
        # [web]: a marketing message's unsubscribe is base_url/u/<signed token> (mailer serve);
        # an explicit [message] list_unsubscribe stays the user's choice.
        self._web_unsubscribe: tuple[TokenSigner, str] | None = None
        web = config.web
        if self._unsubscribe_url is None and web is not None and web.base_url and message.kind == "marketing":
            signer = TokenSigner.from_environment(web.secret_env, web.previous_secret_envs)
            self._web_unsubscribe = (signer, web.base_url.rstrip("/") + "/u/")
            available.add("unsubscribe_url")
        self._tracker = tracker_for(config, self.name)
        self.return_path = return_path
        self._verp: tuple[TokenSigner, str, str] | None = None
        if return_path is not None and "{token}" in return_path:
            verp_signer = (
                self._web_unsubscribe[0]
                if self._web_unsubscribe is not None
                else TokenSigner.from_environment(
                    web.secret_env if web is not None else "MAILER_WEB_SECRET",
                    web.previous_secret_envs if web is not None else (),
                )
            )
            before, _, after = return_path.partition("{token}")
            self._verp = (verp_signer, before, after)
        self.template.check_variables(available, columns=self.reader.columns)
        if "from" not in [n.lower() for n in self.template.header_names] and not message.from_:
            raise TemplateError(
                "the template has no From: header and the config has no [message] from.",
                path=str(self.template.path),
                hint="Add 'From: Name <address>' to the template, or set from = \"...\" under [message] in mailer.toml.",
            )
        list_id, label = self._list_id(message.list_id, kind=message.kind)
        self.builder = builder or MessageBuilder(
            default_from=message.from_,
            default_reply_to=message.reply_to,
            list_id=list_id,
            list_label=label,
            clock=clock,
        )
        self.feedback_id = message.feedback_id
        self.contacts_name = self.reader.display_name

    def _compile_config_template(
        self, env: Environment, key: str, source: str, *, available: set[str]
    ) -> ValueTemplate:
        where = str(self.config.path or "mailer.toml")
        try:
            parsed = env.parse(source)
        except TemplateSyntaxError as exc:
            raise ConfigError(f"'{key}' is not a valid template: {exc.message}.", key=key, path=where) from None
        except (RecursionError, MemoryError, SyntaxError):
            raise ConfigError(f"'{key}' is nested too deeply to compile.", key=key, path=where) from None
        unsafe = find_unsafe_attribute(parsed)
        if unsafe is not None:
            raise ConfigError(
                f"'{key}' uses the attribute {unsafe[0]!r}, which templates may not reach.",
                key=key,
                path=where,
                hint="Names starting with _ are Python internals; the sandbox refuses them.",
            )
        # Checked here, like the template's own variables: at render time an unknown
        # name would fail every row and log the whole list as invalid.
        unknown = sorted(meta.find_undeclared_variables(parsed) - available)
        if unknown:
            raise ConfigError(
                f"'{key}' uses {{{{ {unknown[0]} }}}}, which is not defined.",
                key=key,
                path=where,
                hint=f"It can use email, campaign and the contact file's columns: {', '.join(self.reader.columns)}.",
            )
        try:
            compiled = env.from_string(parsed)
        except (RecursionError, MemoryError, SyntaxError):
            raise ConfigError(f"'{key}' is nested too deeply to compile.", key=key, path=where) from None
        return ValueTemplate(compiled, key=key, path=where, budget=self.budget)

    def _list_id(self, configured: str | None, *, kind: str) -> tuple[str | None, str | None]:
        """(List-Id value, or the label of the default one) for this campaign's messages.

        Marketing mail gets ``List-Id: <campaign.from-domain>`` unless ``[message]
        list_id`` names another: List-Unsubscribe without List-Id is what SpamAssassin's
        LIST_PARTIAL_SHORT_MSG (+1.0) scores on every short message.
        """
        if configured is None:
            return None, (list_label(self.name) if kind == "marketing" else None)
        value = configured.strip()
        if "<" not in value:
            value = f"<{value}>"
        if not _LIST_ID.fullmatch(value):
            raise ConfigError(
                f"'message.list_id' {configured!r} is not a List-Id (RFC 2919).",
                key="message.list_id",
                path=str(self.config.path or "mailer.toml"),
                hint='Write it as a domain-like name, optionally after a description: list_id = "Acme News '
                '<news.acme.example>".',
            )
        return value, None

    @property
    def unsubscribe_configured(self) -> bool:
        return bool(self._unsubscribe_url or self._unsubscribe_mailto or self._web_unsubscribe)

    def close(self) -> None:
        self.reader.close()

    def _extra_headers(self, variables: dict[str, Any]) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        targets = []
        if self._unsubscribe_mailto:
            targets.append(f"<mailto:{self._unsubscribe_mailto}?subject=unsubscribe>")
        one_click = self._unsubscribe_url is not None or self._web_unsubscribe is not None
        if one_click:
            targets.append(f"<{variables['unsubscribe_url']}>")
        if targets:
            headers.append(("List-Unsubscribe", ", ".join(targets)))
        if one_click:
            # RFC 8058 §3.1: the POST body a receiver sends to the HTTPS URI.
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        if self.feedback_id:
            headers.append(("Feedback-ID", self.feedback_id))
        return headers

    def messages(
        self,
        summary: Summary,
        *,
        settle: Settle | None = None,
        on_skipped: Callable[[Contact, Skip], None] | None = None,
        on_problem: Callable[[Problem, Contact | None], None] | None = None,
        keep: Callable[[int], bool] | None = None,
        reader: ContactReader | None = None,
    ) -> Generator[tuple[Contact, BuiltMessage], None, None]:
        """Yield (contact, message) for every selected contact, recording problems in ``summary``.

        ``settle`` pairs each selected contact with why it is not mailed now (a
        :class:`Skip`, counted in ``summary``; the sender asks its send log a batch at a
        time) or None; ``on_skipped`` is told of each contact so left out, and
        ``on_problem`` of each bad row. ``keep`` (cooperating runs) says by a row's line
        whether it is this run's: the others are still read, so that a duplicate is
        found across the whole file, but neither counted nor mailed. ``reader`` reads
        the contacts instead of the campaign's own reader (another pass over the file).
        """
        seen = SeenAddresses()

        def problem(item: Problem, contact: Contact | None = None) -> None:
            summary.add_problem(item)
            if on_problem:
                on_problem(item, contact)

        try:
            candidates = self._candidates(summary, seen, problem, keep=keep, reader=reader or self.reader)
            settled = settle(candidates) if settle is not None else ((contact, None) for contact in candidates)
            yield from self._selected(summary, settled, on_skipped, problem)
        finally:
            close = getattr(settled, "close", None)
            if close is not None:
                close()  # a look-ahead generator: let it settle its accounts now
            seen.close()

    def _candidates(
        self,
        summary: Summary,
        seen: SeenAddresses,
        problem: Callable[..., None],
        *,
        keep: Callable[[int], bool] | None,
        reader: ContactReader,
    ) -> Iterator[Contact]:
        """The valid, selected (``--where``), first-seen contacts (of this run's rows: ``keep``)."""
        where = self.where
        engagement = self._engagement
        campaign_name = self.name
        counts = summary.counts
        for item in reader:
            mine = keep is None or keep(item.line)
            if mine:
                counts["rows"] += 1
            if isinstance(item, Rejected):
                if mine:
                    problem(Problem(item.line, item.kind, item.reason, item.email))
                continue
            variables = item.variables
            variables["campaign"] = campaign_name
            if engagement is not None:
                variables["engagement"] = engagement.of(item.envelope)
            if where is not None and not where(variables):
                if mine:
                    counts["filtered"] += 1
                continue
            earlier = seen.add(address_key(item.envelope).encode("utf-8", "surrogatepass"), item.line)
            if earlier is not None:
                if mine:
                    problem(
                        Problem(item.line, "duplicate", f"{item.email} already appears on line {earlier}", item.email)
                    )
                continue
            if mine:
                yield item

    def _selected(
        self,
        summary: Summary,
        settled: Iterable[tuple[Contact, Skip | None]],
        on_skipped: Callable[[Contact, Skip], None] | None,
        problem: Callable[..., None],
    ) -> Iterator[tuple[Contact, BuiltMessage]]:
        handled = 0
        counts = summary.counts
        for item, skip in settled:
            if self.limit is not None and handled >= self.limit:
                counts["over_limit"] += 1
                continue
            if skip is not None:
                counts[skip] += 1
                if on_skipped is not None:
                    on_skipped(item, skip)
                continue
            variables = item.variables
            try:
                if self._unsubscribe_url is not None:
                    variables["unsubscribe_url"] = header_safe_url(self._unsubscribe_url.render(variables))
                elif self._web_unsubscribe is not None:
                    signer, prefix = self._web_unsubscribe
                    variables["unsubscribe_url"] = header_safe_url(
                        prefix + signer.unsubscribe_token(self.name, item.email)
                    )
                rendered = self.template.render(variables)
                if self._tracker is not None and rendered.html is not None:
                    rendered.html = self._tracker.apply(
                        rendered.html, item.email, unsubscribe_url=variables.get("unsubscribe_url")
                    )
                message = self.builder.build(rendered, contact=item, extra_headers=self._extra_headers(variables))
                if self._verp is not None:
                    verp_signer, before, after = self._verp
                    message.sender = before + verp_signer.verp_token(self.name, item.envelope) + after
                elif self.return_path is not None:
                    message.sender = self.return_path
            except RenderAbort as exc:
                if handled == 0:
                    raise  # the template's fault, met before any message was handed out: exit 2
                problem(Problem(item.line, "error", str(exc), item.email), item)
                continue
            except (RowError, TemplateError, UndefinedError) as exc:
                text = exc.message if isinstance(exc, MailerError) else str(exc)
                problem(Problem(item.line, "error", text, item.email), item)
                continue
            handled += 1
            yield item, message
