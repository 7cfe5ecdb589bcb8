"""The `ferry` command-line tool (see `ferry.cli.main`)."""
