"""One module per CLI command: cli.py parses arguments and dispatches here."""
