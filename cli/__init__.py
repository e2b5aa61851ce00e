"""The `kb` command line: the top floor, wiring every package below it (kb, ingest, retrieval,
serve, finetune, eval); nothing in the project imports it."""

from cli.main import main

__all__ = ["main"]
