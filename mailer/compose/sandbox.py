"""The Jinja environment every template, config value and ``--where`` runs in.

Template files and CSV values are input, not code: a template must not reach Python
objects (``lipsum.__globals__['os']``), files or the environment (where the SMTP
password lives). Everything is rendered in Jinja's ``ImmutableSandboxedEnvironment``:
attributes starting with ``_`` and Python internals are refused, built-in lists and
dicts cannot be changed, ``range`` is capped at 100,000 items.

Attribute names written in the template itself are checked when it is compiled
(:func:`find_unsafe_attribute`), so that a probe behind an ``{% if %}`` that the first
rows do not take is found before anything is built; the sandbox catches the rest
(names built at render time) when they are used.
"""

from __future__ import annotations

import atexit
import functools
import re
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup

__all__ = [
    "RenderBudget",
    "RenderLimitError",
    "Sandbox",
    "SecurityError",
    "find_unsafe_attribute",
    "render_bounded",
    "render_deadline",
    "stop_render_timer",
    "template_line",
]


class RenderLimitError(Exception):
    """Rendering went over its budget: too long, too large, or one step too large."""


@dataclass(frozen=True)
class RenderBudget:
    """What one message's rendering may take (``[send] render_timeout`` / ``render_max_bytes``)."""

    seconds: float = 10.0
    max_bytes: int = 10_000_000


# Width and precision numbers in printf-style ('%999999999s') and format specs.
_PRINTF_NUMBERS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?[a-zA-Z%]?")
_SPEC_NUMBERS = re.compile(r"\d+")
_LIPSUM_MAX = 1000  # paragraphs, and words per paragraph


def _too_large(what: str, size: int, limit: int) -> RenderLimitError:
    return RenderLimitError(f"{what} would make {size:,} characters, over the limit of {limit:,} (render_max_bytes)")


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, with widths and precisions bounded."""

    def __init__(self, env: Sandbox) -> None:
        super().__init__(env)
        self._limit = env.max_size

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in _SPEC_NUMBERS.findall(format_spec):
            if len(number) > 12 or int(number) > self._limit:
                raise _too_large(f"the format width {format_spec!r}", int(number[:13]), self._limit)
        return super().format_field(value, format_spec)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with ``a ~ b`` checked for size (it has no sandbox hook)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with mailer's options and bounds.

    Beyond what Jinja refuses, no single step may build a string or list longer than
    ``max_size``: string and list ``*`` and ``+``, ``**`` on integers, ``~``, printf
    and ``str.format`` widths, ``center``/``ljust``/``rjust``/``zfill``, ``indent``,
    ``replace``, ``join``, ``batch``/``slice`` padding and ``lipsum`` are checked
    before they run. Time and total output are bounded by :func:`render_bounded`.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self, *, autoescape: bool = False, max_size: int = RenderBudget.max_bytes, **options: Any) -> None:
        options.setdefault("undefined", StrictUndefined)
        options.setdefault("auto_reload", False)
        options.setdefault("cache_size", 0)
        super().__init__(autoescape=autoescape, **options)
        self.max_size = max_size
        self.globals["lipsum"] = self._lipsum
        self.globals["range"] = _bounded_range
        for name, check in (
            ("center", self._check_width_filter),
            ("indent", self._check_indent),
            ("format", self._check_format_filter),
            ("replace", self._check_replace_filter),
            ("join", self._check_join),
            ("batch", self._check_count_filter),
            ("slice", self._check_count_filter),
        ):
            self.filters[name] = _checked(self.filters[name], check)

    # -- hooks the sandbox offers ---------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limit = self.max_size
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, (str, list, tuple))
                    and isinstance(times, int)
                    and len(sequence) * times > limit
                ):
                    raise _too_large("this multiplication", len(sequence) * times, limit)
        elif operator == "+":
            sequences = isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple))
            if sequences and len(left) + len(right) > limit:
                raise _too_large("this addition", len(left) + len(right), limit)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                bits = abs(left).bit_length() * right
                if bits > 8 * limit:
                    raise RenderLimitError(f"{left} ** {right} is too large a number to compute")
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left)
        return self.checked_size(self.binop_table[operator](left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(__obj.__self__, str):
            __self._check_str_method(__obj.__self__, __obj.__name__, args)
        return __self.checked_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        text = value.__self__
        if not isinstance(text, str) or isinstance(text, Markup):
            # Markup's own format escapes its arguments; the width check comes after.
            wrapped = super().wrap_str_format(value)
            return None if wrapped is None else functools.update_wrapper(self._sized(wrapped), value)
        formatter = _BoundedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return str(self.checked_size(formatter.vformat(text, args, kwargs)))

        return functools.update_wrapper(wrapper, value)

    # -- checks -----------------------------------------------------------------------------
    def checked_size(self, value: Any) -> Any:
        """``value``, unless it is a string or list longer than the limit."""
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_size:
            raise _too_large("a value", len(value), self.max_size)
        return value

    def _sized(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def sized(*args: Any, **kwargs: Any) -> Any:
            return self.checked_size(function(*args, **kwargs))

        return sized

    def _check_number(self, what: str, number: Any, *, times: int = 1, base: int = 0) -> None:
        if isinstance(number, int) and number * times + base > self.max_size:
            raise _too_large(what, number * times + base, self.max_size)

    def _check_printf(self, text: str) -> None:
        for match in _PRINTF_NUMBERS.finditer(text):
            for number in match.groups():
                if number and (len(number) > 12 or int(number) > self.max_size):
                    raise _too_large(f"the format {match.group(0)!r}", int(number[:13]), self.max_size)

    def _check_str_method(self, text: str, name: str, args: tuple[Any, ...]) -> None:
        if name in ("center", "ljust", "rjust", "zfill") and args:
            self._check_number(f"str.{name}()", args[0])
        elif name == "expandtabs" and args:
            self._check_number("str.expandtabs()", args[0], times=text.count("\t"), base=len(text))
        elif name == "replace" and len(args) >= 2:
            self._check_replace(text, *args[:2])
        elif name == "join" and args:
            self._check_join_items(args[0], text)

    def _check_replace(self, text: Any, old: Any, new: Any, *_: Any) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            count = text.count(old) if old else len(text) + 1
            self._check_number("this replace", count, times=len(new), base=len(text))

    def _check_width_filter(self, value: Any, width: Any = 80, *_: Any, **__: Any) -> None:
        self._check_number("this width", width)

    def _check_indent(self, value: Any, width: Any = 4, *_: Any, **__: Any) -> None:
        lines = str(value).count("\n") + 1
        size = len(width) if isinstance(width, str) else width
        self._check_number("this indent", size, times=lines, base=len(str(value)))

    def _check_format_filter(self, value: Any, *_: Any, **__: Any) -> None:
        self._check_printf(str(value))

    def _check_replace_filter(self, text: Any, old: Any, new: Any, *_: Any, **__: Any) -> None:
        self._check_replace(str(text), str(old), str(new))

    def _check_join(self, items: Any, separator: Any = "", *_: Any, **__: Any) -> None:
        self._check_join_items(items, separator)

    def _check_join_items(self, items: Any, separator: Any) -> None:
        if isinstance(items, (list, tuple)):
            size = sum(len(item) for item in items if isinstance(item, str)) + len(str(separator)) * len(items)
            self._check_number("this join", size)

    def _check_count_filter(self, value: Any, count: Any = 1, fill_with: Any = None, *_: Any) -> None:
        if fill_with is not None:
            self._check_number("this padding", count)

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
        if not all(isinstance(v, int) and v <= _LIPSUM_MAX for v in (n, min, max)):
            raise RenderLimitError(f"lipsum() takes at most {_LIPSUM_MAX} paragraphs of {_LIPSUM_MAX} words")
        return str(self.checked_size(generate_lorem_ipsum(n=n, html=html, min=min, max=max)))


def _bounded_range(*args: int) -> range:
    """``range`` of at most 100,000 items (Jinja's sandbox limit), refused with a clear error."""
    result = range(*args)
    if len(result) > MAX_RANGE:
        raise RenderLimitError(f"range() of {len(result):,} items is over the limit of {MAX_RANGE:,}")
    return result


def _checked(function: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    """A filter that runs ``check`` on its arguments first (keeping Jinja's pass_* marks)."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        # Some filters take Jinja's evaluation context first (pass_eval_context).
        check(*(args[1:] if args and isinstance(args[0], EvalContext) else args), **kwargs)
        return function(*args, **kwargs)

    return checked


def _is_unsafe_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith("_")


def find_unsafe_attribute(ast: nodes.Template) -> tuple[str, int] | None:
    """The first attribute the sandbox would refuse that the template names literally.

    ``x.__class__``, ``x['__globals__']`` and ``x|attr('_private')``: (name, line).
    """
    found: list[tuple[int, str]] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr) and _is_unsafe_name(node.attr):
            found.append((node.lineno, node.attr))
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and _is_unsafe_name(node.arg.value):
            found.append((node.lineno, node.arg.value))
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            argument = node.args[0]
            if isinstance(argument, nodes.Const) and _is_unsafe_name(argument.value):
                found.append((node.lineno, argument.value))
    if not found:
        return None
    line, name = min(found)
    return name, line


class _Alarm:
    """One SIGALRM timer shared by every render in this process.

    Arming a timer per message (two system calls) and asking which handler is set
    cost more than rendering a short message; instead each render notes when it
    started, and the timer, armed once, checks when it fires: over time, it raises
    in the render's frame; otherwise it re-arms itself for the rest of that render's
    time, or stays off until the next render. So a run takes at most one signal per
    ``seconds``, and system calls it meets are restarted (SA_RESTART).
    """

    def __init__(self) -> None:
        self.started: float | None = None  # monotonic start of the render under way
        self.seconds = 0.0
        self.armed = False
        self.installed = False

    def handle(self, signum: int, frame: Any) -> None:
        self.armed = False
        started = self.started
        if started is None:
            return
        left = started + self.seconds - time.monotonic()
        if left <= 0:
            self.started = None
            raise RenderLimitError(f"took longer than render_timeout ({self.seconds:g} s)")
        self.arm(left)

    def arm(self, seconds: float) -> None:
        # Checked on every arming (at most once per ``seconds``, not per message): a
        # timer that fires while another handler, or the default one, is set would
        # end the process ("Alarm clock").
        if not self.installed or signal.getsignal(signal.SIGALRM) != self.handle:
            signal.signal(signal.SIGALRM, self.handle)
            signal.siginterrupt(signal.SIGALRM, False)
            if not self.installed:
                # The interpreter's shutdown sets the default handler back, whose action
                # ends the process: a timer left armed by library use must be off by then.
                atexit.register(self.disarm)
            self.installed = True
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm(self) -> None:
        """Stop the timer (at the end of a command): none may fire after the work it guards."""
        if self.armed and threading.current_thread() is _MAIN_THREAD:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.armed = False
        self.started = None


def stop_render_timer() -> None:
    """Stop the render timer; a command calls this when it ends, whatever the outcome."""
    _alarm.disarm()


_alarm = _Alarm()
_MAIN_THREAD = threading.main_thread()


@contextmanager
def render_deadline(seconds: float) -> Iterator[None]:
    """Raise RenderLimitError in this (main) thread when ``seconds`` pass.

    A signal interrupts a loop with no output ({% for %}{% for %}...) between two
    Python steps, which no check in the output stream could. Off the main thread
    (signals only reach that one) the size limits still hold.
    """
    if not seconds or threading.current_thread() is not _MAIN_THREAD:
        yield
        return
    alarm = _alarm
    alarm.seconds = seconds
    alarm.started = time.monotonic()
    if not alarm.armed:
        alarm.arm(seconds)
    try:
        yield
    finally:
        alarm.started = None


def render_bounded(template: Any, variables: dict[str, Any], budget: RenderBudget) -> str:
    """Render ``template`` within ``budget``; RenderLimitError (raised inside the
    template's frames, so that :func:`template_line` finds the line) when it is spent."""
    generator = template.root_render_func(template.new_context(variables))
    limit = budget.max_bytes
    alarm = _alarm if budget.seconds and threading.current_thread() is _MAIN_THREAD else None
    if alarm is not None:
        alarm.seconds = budget.seconds
        alarm.started = time.monotonic()
        if not alarm.armed:
            alarm.arm(budget.seconds)
    try:
        # Pulled in batches (in C) rather than chunk by chunk: a short message is one
        # or two batches; a long one is stopped within a batch of its limit.
        chunks: list[str] = []
        size = 0
        while True:
            batch = list(islice(generator, _BATCH))
            size += sum(map(len, batch))
            if size > limit:
                generator.throw(RenderLimitError(f"the message would be over {limit:,} characters (render_max_bytes)"))
            chunks += batch
            if len(batch) < _BATCH:
                return "".join(chunks)
    finally:
        if alarm is not None:
            alarm.started = None


_BATCH = 32


def template_line(template: Any, traceback: Any) -> int | None:
    """The line of ``template`` (a compiled Jinja template) where ``traceback`` was raised."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__jinja_template__") is template:
            line = template.get_corresponding_lineno(traceback.tb_lineno)
        traceback = traceback.tb_next
    return line
