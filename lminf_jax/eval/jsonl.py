"""JSON Lines as benchmarks ship them: one JSON value per line, blank lines skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lminf_jax.errors import UserError


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
  """Yields (where, value) per non-blank line, `where` as "PATH line N" for error messages. A line ends at a
  newline only (a JSON string may hold a raw U+2028, which `str.splitlines` would split). Raises UserError
  for a missing or unreadable file and for a line that is not JSON."""
  try:
    with open(path, encoding="utf-8") as lines:
      for number, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          value = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{path} line {number}: not JSON ({e.msg})") from None
        yield f"{path} line {number}", value
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}") from None
