"""Reading input files: every failure (missing, unreadable, not UTF-8, not JSON) is a one-line UserError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lminf_jax.errors import UserError


def open_error(path: Path, error: OSError) -> UserError:
  """The UserError saying why `path` cannot be opened."""
  if isinstance(error, (FileNotFoundError, NotADirectoryError)):
    return UserError(f"no such file: {path}")
  if isinstance(error, PermissionError):
    return UserError(f"cannot read {path}: permission denied")
  if isinstance(error, IsADirectoryError):
    return UserError(f"{path} is a directory, not a file")
  return UserError(f"cannot read {path}: {error.strerror or error}")


def readable_file(path: str | Path) -> Path:
  """`path`, after checking that it is a file this process may read."""
  path = Path(path)
  try:
    with open(path, "rb"):
      pass
  except OSError as e:
    raise open_error(path, e) from None
  if not path.is_file():  # e.g. a fifo or a device
    raise UserError(f"{path} is not a regular file")
  return path


def read_bytes(path: str | Path) -> bytes:
  path = Path(path)
  try:
    return path.read_bytes()
  except OSError as e:
    raise open_error(path, e) from None


def read_text(path: str | Path) -> str:
  """The UTF-8 text of `path`."""
  try:
    return read_bytes(path).decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text: {e}") from None


def read_json(path: str | Path) -> Any:
  """The JSON value in the UTF-8 file `path`."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None


def read_json_object(path: str | Path) -> dict:
  """The JSON object (a dict) in `path`."""
  value = read_json(path)
  if not isinstance(value, dict):
    raise UserError(f"{path} must hold a JSON object, got a {type(value).__name__}")
  return value
