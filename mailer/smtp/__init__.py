"""The SMTP client: session setup, the transaction, reply classification, the relay probe."""
