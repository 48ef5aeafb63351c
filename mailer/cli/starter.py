"""`mailer init`: a working starter project (config, contacts, template)."""

from __future__ import annotations

from pathlib import Path

from ..core.config import write_config
from ..core.errors import UsageError

__all__ = ["STARTER_CONFIG", "STARTER_CONTACTS", "STARTER_TEMPLATE", "write_starter"]


STARTER_CONFIG = {
    "smtp": {
        "host": "smtp.example.com",
        "port": 587,
        "security": "starttls",
        "username": "news@example.com",
        "password_env": "MAILER_SMTP_PASSWORD",
        "timeout": 30,
    },
    "send": {"rate": "10/s", "connections": 4, "max_per_connection": 100, "retries": 3, "retry_backoff": 2.0},
    "message": {
        "from": "Example News <news@example.com>",
        "reply_to": "support@example.com",
        "list_unsubscribe": "https://example.com/unsubscribe?u={{ email | urlencode }}",
        "list_unsubscribe_mailto": "unsubscribe@example.com",
        "kind": "marketing",
    },
    "log": {"path": "mailer.sqlite3"},
}

STARTER_CONTACTS = """email,First Name,Last Name,plan
jane@example.com,Jane,Doe,pro
ana@example.org,Ana,García,team
ravi@example.net,Ravi,Patel,free
"""

STARTER_TEMPLATE = """To: {{ first_name }} {{ last_name }} <{{ email }}>
Subject: Welcome, {{ first_name }}!

# Hello {{ first_name }}!

Thanks for choosing the **{{ plan }}** plan.
{% if plan == 'team' %}
Invite your team at <https://example.com/team>.
{% endif %}

— Example News

[Unsubscribe]({{ unsubscribe_url }})
"""


def write_starter(directory: Path, *, force: bool = False) -> list[Path]:
    """Write mailer.toml, contacts.csv and welcome.md.j2 into ``directory``.

    Refuses to overwrite an existing file unless ``force``.
    """
    files = {
        directory / "mailer.toml": None,
        directory / "contacts.csv": STARTER_CONTACTS,
        directory / "welcome.md.j2": STARTER_TEMPLATE,
    }
    existing = [path for path in files if path.exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}; nothing was written.",
            hint="Pass --force to overwrite, or choose another folder: mailer init DIR.",
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, content in files.items():
            if content is None:
                write_config(path, STARTER_CONFIG)
            else:
                path.write_text(content, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write into {directory} ({exc.strerror}).") from None
    return list(files)
