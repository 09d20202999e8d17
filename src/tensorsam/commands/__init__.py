"""CLI subcommands, one module each (see tensorsam.cli)."""
