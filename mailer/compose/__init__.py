"""Composing messages: contacts, templates, the message builder, campaign selection, dry-run writers."""
