"""DKIM signing: the signer, its keys, and the DNS record text."""
