"""Shared fixtures. Fixture modules live beside this file and are loaded when present."""

import pathlib
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

pytest_plugins = [
    name for name in ("smtp_fixtures", "dns_fixtures", "cli_fixtures", "pg_fixtures") if (HERE / f"{name}.py").exists()
]
