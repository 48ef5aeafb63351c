"""`mailer check`: the config, the relay, the sender's DNS and the list."""
