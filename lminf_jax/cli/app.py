"""The `lminf` command line. Bad input prints one line `lminf: error: ...` and exits non-zero."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from lminf_jax.errors import UserCodeError, UserError, without_closed_loop_reports
from lminf_jax.util import interrupt
from lminf_jax.util.atomic import disk_full


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, no usage dump
    print(f"lminf: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  from lminf_jax.cli import eval as eval_commands
  from lminf_jax.cli import model, run

  parser = _Parser(prog="lminf", description="Training-free long-context attention for Llama models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  model.register(sub)
  run.register(sub)
  eval_commands.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one command. Ctrl-C and SIGTERM are taken from the first instruction: nothing slow (the
  parser imports jax) comes before `interrupt.handling`, and an interrupted command exits 128 + the
  signal number with nothing written, whenever the signal came."""
  with interrupt.handling():
    try:
      return _run(argv)
    finally:
      if interrupt.requested():
        interrupt.exit_now()


def _run(argv: list[str] | None) -> int:
  # transformers without torch (the run time needs none) would print an advisory on every command.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  # Orbax logs each failure of its writer threads with a traceback; the error that reaches us says it in one line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  sys.unraisablehook = without_closed_loop_reports(sys.unraisablehook)
  parser = build_parser()
  args = parser.parse_args(argv)
  if interrupt.requested():  # (during the imports: before any work)
    interrupt.exit_now()
  try:
    _refuse_empty_values(parser, args)
    args.func(args)
  except UserError as e:
    if isinstance(e, UserCodeError) and os.environ.get("LMINF_TRACEBACK"):
      traceback.print_exception(e.error)
    return _error(str(e))
  except Exception as e:
    from lminf_jax.attention.registry import raised_in_user_code

    if where := raised_in_user_code(e):  # a user's method failed while it ran
      if os.environ.get("LMINF_TRACEBACK"):
        traceback.print_exception(e)
      return _error(str(UserCodeError(f"attention method code at {where}", e)))
    if disk_full(e):
      return _error(f"no space left on device{_file_of(e)}")
    if isinstance(e, OSError) and e.strerror:  # permissions, read-only file systems, ...
      return _error(f"{e.strerror}{_file_of(e)}")
    raise
  return 0


def _refuse_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """An empty string given to any argument is refused, not read as absent (`--json ""` writing nothing,
  `--mesh ""` running on one device) or as a match of everything (`--stop ""` stopping at once)."""
  command = parser._subparsers._group_actions[0].choices[args.command]
  for action in command._actions:
    value = getattr(args, action.dest, None)
    if value == "" or (isinstance(value, list) and "" in value):
      raise UserError(f"{'/'.join(action.option_strings) or action.dest}: empty {action.dest.replace('_', ' ')} given")


def _error(message: str) -> int:
  print(f"lminf: error: {message}", file=sys.stderr)
  return 1


def _file_of(error: BaseException) -> str:
  """': PATH' for the first file named by `error` or the errors it was raised from."""
  while error is not None:
    if isinstance(error, OSError) and error.filename:
      return f": {error.filename}"
    error = error.__cause__ or error.__context__
  return ""
