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

from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["Sandbox", "SecurityError", "find_unsafe_attribute", "template_line"]


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with mailer's options (strict undefined, no cache)."""

    def __init__(self, *, autoescape: bool = False, **options: Any) -> None:
        options.setdefault("undefined", StrictUndefined)
        options.setdefault("auto_reload", False)
        options.setdefault("cache_size", 0)
        super().__init__(autoescape=autoescape, **options)


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


def template_line(template: Any, traceback: Any) -> int | None:
    """The line of ``template`` (a compiled Jinja template) where ``traceback`` was raised."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__jinja_template__") is template:
            line = template.get_corresponding_lineno(traceback.tb_lineno)
        traceback = traceback.tb_next
    return line
