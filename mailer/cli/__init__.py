"""The command line: the Typer app, terminal output, preview and starter files."""

from .app import app, main

__all__ = ["app", "main"]
