"""Subcommands of `veil`, each module adding its own parsers with `register(sub)`."""
