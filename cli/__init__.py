"""The `sortie` command line (typer)."""
