"""What everything else stands on: config, errors and exit codes, addresses, outcomes."""
