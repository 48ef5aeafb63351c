"""Template files: parse the header block, compile the Jinja parts once, render per contact.

A template is a header block, one blank line, then the body (see PRODUCT.md). The
body's kind follows the file name: ``.txt.j2``, ``.md.j2`` or ``.html.j2``.

Everything that does not depend on the contact is done once here: Markdown is
converted to HTML and its CSS inlined on the *template* (with each Jinja tag held in
place by an inert placeholder), and the plain-text alternative of an HTML template is
derived the same way. Per contact only Jinja rendering remains.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import css_inline
from inscriptis import get_text
from inscriptis.model.config import ParserConfig
from jinja2 import Environment, TemplateSyntaxError, UndefinedError, meta, nodes
from markdown_it import MarkdownIt

from ..core.errors import RowError, TemplateError
from .sandbox import (
    RenderBudget,
    RenderLimitError,
    Sandbox,
    SecurityError,
    find_unsafe_attribute,
    render_bounded,
    template_line,
)

__all__ = [
    "BUILTIN_VARIABLES",
    "DEFAULT_CSS",
    "MessageTemplate",
    "RenderAbort",
    "Rendered",
    "ValueTemplate",
    "check_template_source",
    "html_to_text",
    "load_template",
]


BUILTIN_VARIABLES = ("email", "campaign")
# Headers mailer writes itself; a template that sets them would produce a broken message.
_RESERVED_HEADERS = {
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "dkim-signature",
    "list-unsubscribe",
    "list-unsubscribe-post",
}
# The same set as message.ADDRESS_HEADERS (message.py imports this module, not the reverse).
_ADDRESS_HEADERS = {"from", "to", "cc", "bcc", "reply-to", "sender"}
_HEADER_LINE = re.compile(r"^([!-9;-~]+):[ \t]?(.*)$")
_JINJA_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_PLACEHOLDER = re.compile(r"MAILERJ(\d+)X")
# Placeholders of statements ({% ... %}) that ended up alone in a paragraph: unwrap them
# so that a false `{% if %}` does not leave an empty <p></p> behind.
_STATEMENT_PARAGRAPH = re.compile(r"<p>((?:MAILERJ\d+X\s*)+)</p>\n?")
# A line holding only statements becomes an HTML comment before Markdown sees it: an
# HTML block interrupts a paragraph (CommonMark §4.6), so the tag is not swallowed as a
# lazy continuation line into the list item above it. (It was: a {% for %} around list
# items put {% endfor %} inside the last <li> and nested one more <ul> per iteration.)
_STATEMENT_LINE = re.compile(r"^([ \t]*)((?:MAILERJ\d+X[ \t]*)+)$", re.MULTILINE)
_STATEMENT_COMMENT = re.compile(r"<!--((?:MAILERJ\d+X[ \t]*)+)-->\n?")
# A loop around exactly one list: the list's tags go outside the loop, so that the loop
# makes items of one list rather than one list per item.
_LOOPED_LIST = re.compile(
    r"(MAILERJ(\d+)X)\n(<(?:ul|ol)\b[^>]*>\n)((?:(?!<[uo]l\b).)*?)(</(?:ul|ol)>\n)(MAILERJ(\d+)X)", re.DOTALL
)
_FOR_TAG = re.compile(r"\{%-?\s*for\b")
_ENDFOR_TAG = re.compile(r"\{%-?\s*endfor\b")
_TABLE_CONTEXT = re.compile(
    r"<(?:/?(?:table|thead|tbody|tfoot|tr)|/td|/th)\b[^>]*>\s*$|^\s*<(?:/?(?:table|thead|tbody|tfoot|tr)|td|th)\b",
    re.IGNORECASE,
)
_TEXT_CONFIG = ParserConfig(display_links=True)
_SEPARATOR = "\x00"
# "+#}": trim_blocks must not eat a newline the next part starts with.
_NEW_LINE_COMMENT = "{#\n+#}"

DEFAULT_CSS = """
body { margin: 0; padding: 0; background: #ffffff; }
.mailer-body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; font-size: 16px;
  line-height: 1.5; color: #1f2328; max-width: 640px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 16px; }
h2 { font-size: 20px; margin: 24px 0 12px; }
h3 { font-size: 17px; margin: 20px 0 8px; }
p { margin: 0 0 16px; }
a { color: #0969da; }
blockquote { margin: 0 0 16px; padding: 0 16px; border-left: 4px solid #d0d7de; color: #57606a; }
code { font-family: Menlo, Consolas, monospace; font-size: 14px; background: #f6f8fa; padding: 2px 4px; }
pre { background: #f6f8fa; padding: 12px; overflow: auto; }
hr { border: 0; border-top: 1px solid #d0d7de; margin: 24px 0; }
"""


class RenderAbort(TemplateError):
    """A template that broke the sandbox's rules while rendering: the template's fault.

    Nothing of it is used. On the run's first message it stops the run (exit 2: nothing
    was sent); later, that row is reported and the run goes on, so that what was already
    handed to the relay stays accounted for.
    """


@dataclass
class Rendered:
    """One contact's rendered template: header values, bodies and attachment paths."""

    headers: list[tuple[str, str]]
    text: str
    html: str | None
    attachments: list[Path]
    # Lower-cased address header -> how many addresses the template's own text puts
    # there (None: a single {{ value }} or a loop decides). The builder refuses a row
    # whose values change that number, so that no CSV value can add a recipient.
    address_counts: dict[str, int | None] = field(default_factory=dict)


@dataclass
class _Part:
    source: str
    line: int  # file line of the first source line


@dataclass
class MessageTemplate:
    """A parsed and compiled template file. Build with :func:`load_template`."""

    path: Path
    kind: str  # "txt" | "md" | "html"
    header_sources: list[tuple[str, str]]
    attachment_sources: list[str]
    # Per attachment: the folder its rendered path must stay in when the path is
    # templated (the literal part before the first tag), or None when it is literal.
    attachment_folders: list[Path | None]
    text_source: str
    html_source: str | None
    text_from_html: bool  # no precompiled text alternative: derive it per message
    used_variables: dict[str, int]  # name -> first line
    _environment: Environment
    # The file line of the first line of each header and attachment source, in order.
    source_lines: list[int] = field(default_factory=list)
    body_line: int = 1
    budget: RenderBudget = field(default_factory=RenderBudget)

    @property
    def header_names(self) -> list[str]:
        return [name for name, _ in self.header_sources]

    def check_variables(self, available: Iterable[str], *, columns: list[str]) -> None:
        """Fail before any message is built if the template uses a variable no row provides."""
        known = set(available)
        for name, line in sorted(self.used_variables.items(), key=lambda item: item[1]):
            if name in known:
                continue
            close = difflib.get_close_matches(name, sorted(known), n=1)
            did_you_mean = f" Did you mean {close[0]}?" if close else ""
            if name == "unsubscribe_url":
                hint = "It exists only when [message] list_unsubscribe is set in mailer.toml."
            else:
                hint = f"The contact file's columns are: {', '.join(columns)}."
            raise TemplateError(
                f"the template uses {{{{ {name} }}}}, which is not defined.{did_you_mean}",
                path=str(self.path),
                line=line,
                hint=hint,
            )

    def __post_init__(self) -> None:
        # Render everything in ONE Jinja call per contact: each render pays for a new
        # context, which costs more than the rendering of a short template itself.
        # Parts are joined with NUL, which no header or body may contain.
        parts = [source for _, source in self.header_sources] + self.attachment_sources
        # file line of each part's first line; None where the part is derived (its lines
        # are not the file's). The body as written goes first: a fault in it is met
        # there, with the file's own line numbers.
        lines: list[int | None] = list(self.source_lines) or [None] * len(parts)
        html = None
        if self.html_source is not None:
            html = "{% autoescape true %}" + self.html_source + "{% endautoescape %}"
        if self.kind == "html" and html is not None:
            parts += [html, self.text_source]
            lines += [self.body_line, None]
            self._html_index, self._text_index = len(parts) - 2, len(parts) - 1
        else:
            parts.append(self.text_source)
            lines.append(self.body_line)
            self._text_index = len(parts) - 1
            if html is not None:
                parts.append(html)
                lines.append(None)
            self._html_index = len(parts) - 1
        self._part_count = len(parts)
        # Each part after the first starts on a line of its own (a comment holding a
        # newline, which renders as nothing), so that a line of the bundle names one part.
        source = (_SEPARATOR + _NEW_LINE_COMMENT).join(parts)
        self._bundle = _compile_bundle(self._environment, source, self.path)
        self._part_starts: list[tuple[int, int | None]] = []  # (bundle line, file line)
        line = 1
        for part, first in zip(parts, lines):
            self._part_starts.append((line, first))
            line += part.count("\n") + 1
        self._address_counts = {
            name.lower(): _address_count(source)
            for name, source in self.header_sources
            if name.lower() in _ADDRESS_HEADERS
        }

    def render(self, variables: dict[str, Any]) -> Rendered:
        """Render headers, body and attachment paths for one contact."""
        bundle = self._bundle
        try:
            # root_render_func directly, not render(): Jinja's render rewrites the
            # traceback, and the real one tells the template line of a fault.
            output = render_bounded(bundle, variables, self.budget)
        except RenderLimitError as exc:
            raise RenderAbort(
                f"rendering stopped: {exc}.",
                path=str(self.path),
                line=self._file_line(exc),
                hint="Check the loops and sizes there; the limits are [send] render_timeout and render_max_bytes.",
            ) from None
        except MemoryError:
            raise RenderAbort(
                "rendering ran out of memory.", path=str(self.path), hint="Check the template's loops and sizes."
            ) from None
        except RecursionError:
            raise RenderAbort(
                "rendering nested too deeply (macros or includes calling themselves?).", path=str(self.path)
            ) from None
        except SecurityError as exc:
            raise RenderAbort(
                f"the template broke the sandbox: {exc}",
                path=str(self.path),
                line=self._file_line(exc),
                hint="Templates may not reach Python internals (names starting with _).",
            ) from None
        except UndefinedError as exc:
            raise TemplateError(f"rendering failed: {exc.message}.", path=str(self.path)) from None
        except Exception as exc:
            # The template's own code failed on this row's values ({{ total / count }}
            # with count 0, int('n/a')...): that row is reported, the run goes on.
            raise RowError(f"rendering {self.path.name} failed: {type(exc).__name__}: {exc}") from None
        parts = output.split(_SEPARATOR)
        if len(parts) != self._part_count:
            raise RowError("a value contains a NUL character, which mail cannot carry")
        count = len(self.header_sources)
        headers = [(name, value) for (name, _), value in zip(self.header_sources, parts)]
        attachment_count = len(self.attachment_sources)
        attachments = [
            _attachment_path(self.path.parent, value.strip(), folder)
            for value, folder in zip(parts[count : count + attachment_count], self.attachment_folders)
        ]
        text = parts[self._text_index]
        html = parts[self._html_index] if self.html_source is not None else None
        if self.text_from_html and html is not None:
            text = html_to_text(html)
        return Rendered(headers, text, html, attachments, self._address_counts)

    def _file_line(self, exc: BaseException) -> int | None:
        """The template file's line where ``exc`` was raised, when it can be told."""
        line = template_line(self._bundle, exc.__traceback__)
        if line is None:
            return None
        start, first = [item for item in self._part_starts if item[0] <= line][-1]
        return None if first is None else first + line - start


class ValueTemplate:
    """A templated config value (``[message] list_unsubscribe``), rendered per contact."""

    def __init__(self, template: Any, *, key: str, path: str, budget: RenderBudget | None = None) -> None:
        self._template = template
        self.key = key
        self.path = path
        self.budget = budget or RenderBudget()

    def render(self, variables: dict[str, Any]) -> str:
        try:
            return render_bounded(self._template, variables, self.budget)
        except (RenderLimitError, MemoryError, RecursionError) as exc:
            reason = str(exc) or type(exc).__name__
            raise RenderAbort(f"'{self.key}': rendering stopped: {reason}.", path=self.path) from None
        except SecurityError as exc:
            raise RenderAbort(f"'{self.key}' broke the sandbox: {exc}", path=self.path) from None
        except UndefinedError as exc:
            raise TemplateError(f"'{self.key}': {exc.message}.", path=self.path) from None
        except Exception as exc:
            raise RowError(f"rendering '{self.key}' failed: {type(exc).__name__}: {exc}") from None


def _address_count(source: str) -> int | None:
    """How many addresses an address header's template text holds, values aside.

    ``{{ name }} <{{ email }}>`` holds one; ``a@x.example, {{ email }}`` two. None when
    one ``{{ value }}`` is the whole header (the CSV column holds the list) or a
    statement decides.
    """
    if "{%" in source or _JINJA_TAG.fullmatch(source.strip()):
        return None
    return len(getaddresses([_JINJA_TAG.sub("x", source)]))


def html_to_text(html: str) -> str:
    """A readable plain-text version of an HTML body (links shown as ``[text](url)``)."""
    text: str = get_text(html, _TEXT_CONFIG)  # inscriptis is untyped
    return text.strip() + "\n"


def _template_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".txt.j2", "txt"), (".md.j2", "md"), (".html.j2", "html"), (".htm.j2", "html")):
        if name.endswith(suffix):
            return kind
    for suffix, kind in ((".txt", "txt"), (".md", "md"), (".html", "html")):
        if name.endswith(suffix):
            return kind
    raise TemplateError(
        "cannot tell the template's kind from its name.",
        path=str(path),
        hint="Name it *.txt.j2 (plain text), *.md.j2 (Markdown) or *.html.j2 (HTML).",
    )


def _environments(max_size: int) -> tuple[Sandbox, Sandbox]:
    # trim_blocks/lstrip_blocks: a line holding only {% if %} leaves no blank line behind.
    options: dict[str, Any] = dict(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    text = Sandbox(autoescape=False, max_size=max_size, **options)
    html = Sandbox(autoescape=True, max_size=max_size, **options)
    for env in (text, html):
        env.filters["mailer_safe_link"] = safe_link
    return text, html


def _compile_bundle(env: Environment, source: str, path: Path) -> Any:
    try:
        return env.from_string(source)
    except (RecursionError, MemoryError, SyntaxError) as exc:  # Python's own limits on nesting
        raise _too_nested(path, exc) from None


def _too_nested(path: Path, exc: BaseException) -> TemplateError:
    return TemplateError(
        f"the template is nested too deeply to compile ({type(exc).__name__}).",
        path=str(path),
        hint="Split deeply nested tags or brackets into smaller steps ({% set %}, macros).",
    )


def check_template_source(ast: nodes.Template, *, path: str, line_offset: int = 0) -> None:
    """Refuse, before anything is rendered, attributes the sandbox forbids (``x.__class__``)."""
    unsafe = find_unsafe_attribute(ast)
    if unsafe is not None:
        name, line = unsafe
        raise TemplateError(
            f"the template uses the attribute {name!r}, which templates may not reach.",
            path=path,
            line=line + line_offset,
            hint="Names starting with _ are Python internals; the sandbox refuses them.",
        )


# A tag that starts a link target: href="{{ url }}" lets the value choose the scheme.
_LINK_TARGET = re.compile(
    r"""(\s(?:href|src|action|formaction|xlink:href|background)\s*=\s*["']?\s*)MAILERJ(\d+)X""", re.I
)
_OUTPUT_TAG = re.compile(r"^\{\{(-?)(.*?)(-?)\}\}$", re.DOTALL)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_IGNORED_IN_URL = re.compile(r"[\x00-\x20\x7f]+")
_SAFE_SCHEMES = {"http", "https", "mailto"}


def safe_link(value: Any) -> Any:
    """A link target from a value: kept when its scheme is http, https or mailto (or it
    has none), else ``#`` (``javascript:``, ``data:``... must not come from a CSV)."""
    text = _IGNORED_IN_URL.sub("", str(value))  # browsers ignore these inside a scheme
    match = _SCHEME.match(text)
    if match and match.group(1).lower() not in _SAFE_SCHEMES:
        return "#"
    return value


def _guard_link_targets(html_source: str) -> str:
    """Pass each ``{{ ... }}`` that starts an href/src value through :func:`safe_link`."""
    protected, tags = _protect(html_source)
    guarded: set[int] = set()
    for match in _LINK_TARGET.finditer(protected):
        guarded.add(int(match.group(2)))
    for index in guarded:
        tag = _OUTPUT_TAG.match(tags[index])
        if tag:
            tags[index] = (
                "{{" + tag.group(1) + " (" + tag.group(2).strip() + ")|mailer_safe_link " + tag.group(3) + "}}"
            )
    return _restore(protected, tags)


def _protect(source: str) -> tuple[str, list[str]]:
    """Replace every Jinja tag with an inert placeholder; return the text and the tags."""
    tags: list[str] = []

    def hold(match: re.Match[str]) -> str:
        tags.append(match.group(0))
        return f"MAILERJ{len(tags) - 1}X"

    return _JINJA_TAG.sub(hold, source), tags


def _restore(text: str, tags: list[str]) -> str:
    return _PLACEHOLDER.sub(lambda m: tags[int(m.group(1))], text)


def _is_statement(tag: str) -> bool:
    return tag.startswith("{%") or tag.startswith("{#")


def _statement_order(text: str, tags: list[str]) -> list[int]:
    return [int(m.group(1)) for m in _PLACEHOLDER.finditer(text) if _is_statement(tags[int(m.group(1))])]


def _markdown_to_html_source(body: str) -> str:
    protected, tags = _protect(body)

    def comment_out(match: re.Match[str]) -> str:
        held = _PLACEHOLDER.findall(match.group(2))
        if all(_is_statement(tags[int(i)]) for i in held):
            return f"{match.group(1)}<!--{match.group(2).strip()}-->"
        return match.group(0)

    def hoist_list(match: re.Match[str]) -> str:
        if not (_FOR_TAG.match(tags[int(match.group(2))]) and _ENDFOR_TAG.match(tags[int(match.group(7))])):
            return match.group(0)
        depth = 0  # the endfor must close this for: loops inside the list must be balanced
        for index in _PLACEHOLDER.findall(match.group(4)):
            depth += 1 if _FOR_TAG.match(tags[int(index)]) else -1 if _ENDFOR_TAG.match(tags[int(index)]) else 0
            if depth < 0:
                return match.group(0)
        if depth:
            return match.group(0)
        return f"{match.group(3)}{match.group(1)}\n{match.group(4)}{match.group(6)}\n{match.group(5)}"

    protected = _STATEMENT_LINE.sub(comment_out, protected)
    html = MarkdownIt("commonmark", {"html": True}).render(protected)
    html = _STATEMENT_COMMENT.sub(lambda match: match.group(1).strip() + "\n", html)
    html = _LOOPED_LIST.sub(hoist_list, html)

    def unwrap(match: re.Match[str]) -> str:
        held = _PLACEHOLDER.findall(match.group(1))
        if all(_is_statement(tags[int(i)]) for i in held):
            return match.group(1).strip() + "\n"
        return match.group(0)

    html = _STATEMENT_PARAGRAPH.sub(unwrap, html)
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{DEFAULT_CSS}</style></head>\n"
        f'<body><div class="mailer-body">\n{html}</div></body></html>\n'
    )
    # Mail clients (Gmail among them) drop <style> blocks: inline the rules once, here.
    inlined = css_inline.inline(page)
    if _statement_order(inlined, tags) != _statement_order(html, tags):
        raise TemplateError("internal: CSS inlining moved a template tag.")  # pragma: no cover
    return _restore(inlined, tags)


def _html_to_text_source(body: str) -> str | None:
    """The text alternative as a Jinja template, or None when it must be derived per message."""
    protected, tags = _protect(body)
    for match in _PLACEHOLDER.finditer(protected):
        if not _is_statement(tags[int(match.group(1))]):
            continue
        before = protected[max(0, match.start() - 200) : match.start()]
        after = protected[match.end() : match.end() + 200]
        # An HTML parser moves text found between table rows out of the table
        # ("foster parenting"), which would tear a {% for %} loop apart.
        if _TABLE_CONTEXT.search(before) or _TABLE_CONTEXT.search(after):
            return None
    text = html_to_text(protected)
    if _statement_order(text, tags) != _statement_order(protected, tags):
        return None
    return _restore(text, tags)


def _split_template(path: Path, source: str) -> tuple[list[tuple[str, str, int]], _Part]:
    lines = source.split("\n")
    headers: list[tuple[str, str, int]] = []
    index = 0
    while index < len(lines):
        line = lines[index].rstrip("\r")
        if line.strip() == "":
            break
        if line[:1] in (" ", "\t") and headers:
            name, value, first = headers[-1]
            headers[-1] = (name, value + " " + line.strip(), first)
        else:
            match = _HEADER_LINE.match(line)
            if not match:
                raise TemplateError(
                    f"expected a header line such as 'Subject: ...', found {line[:60]!r}.",
                    path=str(path),
                    line=index + 1,
                    hint="A template starts with its headers, then one blank line, then the body.",
                )
            headers.append((match.group(1), match.group(2).strip(), index + 1))
        index += 1
    if index >= len(lines):
        raise TemplateError(
            "no blank line after the headers, so the template has no body.",
            path=str(path),
            hint="Put one empty line between the header block and the body.",
        )
    body_line = index + 2
    return headers, _Part("\n".join(lines[index + 1 :]), body_line)


def _compile(env: Environment, part: _Part, path: Path, used: dict[str, int]) -> str:
    """Parse one part, so that syntax errors name the file's own line; return its source."""
    # A comment holding newlines makes Jinja's line numbers those of the template file
    # without adding anything to the output.
    source = ("{#" + "\n" * (part.line - 1) + "#}" if part.line > 1 else "") + part.source
    try:
        ast = env.parse(source, filename=str(path))
        # Analysing the tree also compiles it, which is when Jinja finds an unknown
        # filter or test (TemplateAssertionError, a TemplateSyntaxError).
        undeclared = meta.find_undeclared_variables(ast)
    except TemplateSyntaxError as exc:
        message = (exc.message or "").rstrip(".")
        raise TemplateError(f"template syntax error: {message}.", path=str(path), line=exc.lineno) from None
    except (RecursionError, MemoryError, SyntaxError) as exc:
        raise _too_nested(path, exc) from None
    check_template_source(ast, path=str(path))
    for name in undeclared:
        line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == name), default=part.line)
        used[name] = min(used.get(name, line), line)
    if _SEPARATOR in part.source:
        raise TemplateError("the template contains a NUL character.", path=str(path), line=part.line)
    return part.source


_TAG_START = re.compile(r"\{[{%#]")


def _attachment_folder(template_folder: Path, source: str) -> Path | None:
    """The folder a templated ``Attachment:`` path must stay in; None for a literal path.

    ``invoices/{{ invoice_id }}.pdf`` may name any file under ``invoices/`` (and its
    subfolders), whatever the contact list holds; the template's author chose that
    folder. A value such as ``../../home/me/.ssh/id_rsa`` or ``/etc/passwd`` cannot
    send a file from elsewhere to a recipient.
    """
    source = source.strip()
    tag = _TAG_START.search(source)
    if tag is None:
        return None
    literal_folder = source[: tag.start()].rpartition("/")[0]
    return Path(os.path.realpath(template_folder / literal_folder))


def _attachment_path(template_folder: Path, value: str, folder: Path | None) -> Path:
    path = template_folder / value
    # Compared on real paths: a link inside the folder (invoices/link.pdf -> ../secret.pdf,
    # or invoices/up -> ..) must not carry a contact's value out of it.
    if folder is not None and not Path(os.path.realpath(path)).is_relative_to(folder):
        raise RowError(
            f"attachment path {value!r} leads outside {folder}: a templated Attachment: path "
            "may only name files in the folder its template gives, links resolved (check the contact's values)"
        )
    return path


def load_template(path: Path, *, budget: RenderBudget | None = None) -> MessageTemplate:
    """Read, parse and compile a template file; each message's rendering keeps to ``budget``."""
    budget = budget or RenderBudget()
    kind = _template_kind(path)
    try:
        source = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TemplateError("template file not found.", path=str(path)) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise TemplateError(
            "the template is not valid UTF-8.", path=str(path), line=line, hint="Re-save it as UTF-8."
        ) from None
    except OSError as exc:
        raise TemplateError(f"cannot read the template ({exc.strerror}).", path=str(path)) from None
    source = source.replace("\r\n", "\n")
    raw_headers, body = _split_template(path, source)
    text_env, html_env = _environments(budget.max_bytes)
    used: dict[str, int] = {}
    headers: list[tuple[str, str]] = []
    header_lines: list[int] = []
    attachments: list[str] = []
    attachment_lines: list[int] = []
    attachment_folders: list[Path | None] = []
    seen: set[str] = set()
    for name, value, line in raw_headers:
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS:
            raise TemplateError(
                f"the template sets {name}:, which mailer writes itself.",
                path=str(path),
                line=line,
                hint="Remove that line (List-Unsubscribe comes from [message] list_unsubscribe in mailer.toml).",
            )
        if lowered in seen and lowered not in ("attachment",):
            raise TemplateError(f"the header {name}: appears twice.", path=str(path), line=line)
        seen.add(lowered)
        compiled = _compile(text_env, _Part(value, line), path, used)
        if lowered == "attachment":
            attachments.append(compiled)
            attachment_lines.append(line)
            attachment_folders.append(_attachment_folder(path.parent, value))
        else:
            headers.append((name, compiled))
            header_lines.append(line)
    if "subject" not in seen:
        raise TemplateError(
            "the template has no Subject: header.",
            path=str(path),
            line=1,
            hint="Add 'Subject: ...' to the header block.",
        )

    html = None
    text_from_html = False
    if kind == "txt":
        text = _compile(text_env, body, path, used)
    elif kind == "md":
        text = _compile(text_env, body, path, used)
        html = _compile(html_env, _Part(_guard_link_targets(_markdown_to_html_source(body.source)), 1), path, {})
    else:
        html = _compile(html_env, _Part(_guard_link_targets(body.source), body.line), path, used)
        text_source = _html_to_text_source(body.source)
        if text_source is None:
            text_from_html = True
            text = ""
        else:
            text = _compile(text_env, _Part(text_source, 1), path, {})
    return MessageTemplate(
        path=path,
        kind=kind,
        header_sources=headers,
        attachment_sources=attachments,
        attachment_folders=attachment_folders,
        text_source=text,
        html_source=html,
        text_from_html=text_from_html,
        used_variables=used,
        _environment=text_env,
        source_lines=header_lines + attachment_lines,
        body_line=body.line,
        budget=budget,
    )
