"""The store: the send log, run history and suppression list, behind the SendStore interface."""
