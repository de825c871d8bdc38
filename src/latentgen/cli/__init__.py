"""The `latentgen` command line: the Typer app and one module per group of subcommands.

Importing this package registers every command; torch is imported only inside commands, so that
`latentgen --help` starts fast."""

from importlib import import_module

from .app import app, main

for _group in ("inspect", "generate", "latents", "train"):  # registration order is the order `--help` lists
    import_module(f"{__name__}.{_group}")

__all__ = ["app", "main"]
