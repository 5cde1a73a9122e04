"""The `nostall` command line: its subcommands, the measuring harness and the built-in workloads."""
