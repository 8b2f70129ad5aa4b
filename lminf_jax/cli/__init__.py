"""The `lminf` command line, a module per group of commands (`model`, `run`, `eval`), each command's
parser beside its function; `options` holds what they share, `app` the parser and `main`."""

from lminf_jax.cli.app import main

__all__ = ["main"]
