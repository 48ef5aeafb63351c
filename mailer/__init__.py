"""mailer: bulk mail from a CSV and a Jinja template, through your own SMTP relay."""

__version__ = "0.1.0"
