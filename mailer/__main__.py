"""`python -m mailer` runs the command line."""

from .entry import main

main()
