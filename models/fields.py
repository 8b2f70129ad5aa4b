"""config.json values: the checks every reader runs on them, and token ids both ways."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from lminf_jax.errors import UserError
from lminf_jax.util.limits import INT32_MAX


def check_fields(d: Mapping[str, Any], ints: tuple[str, ...], optional_ints: tuple[str, ...] = (),
                 floats: tuple[str, ...] = ()) -> None:
  """Raises UserError naming the field and its value unless each of `ints` is an integer in
  [1, INT32_MAX], each of `optional_ints` too (or absent / null), and each of `floats` present a
  positive finite number."""
  for name in ints + optional_ints:
    value = d.get(name)
    if value is None:
      if name in ints:
        raise UserError(f"the config lacks {name}")
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= INT32_MAX:
      raise UserError(f"{name} must be an integer in [1, {INT32_MAX}], got {value!r}")
  for name in floats:
    value = d.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value) or value <= 0):
      raise UserError(f"{name} must be a positive number, got {value!r}")


def token_ids(value: Any) -> tuple[int, ...]:
  """A Hugging Face eos_token_id (an id, a list of ids or null) as a tuple of ids."""
  ids = value if isinstance(value, (list, tuple)) else (() if value is None else (value,))
  if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in ids):
    raise UserError(f"eos_token_id must be a token id or a list of them, got {value!r}")
  return tuple(int(i) for i in ids)


def hf_token_ids(ids: tuple[int, ...]) -> int | list[int] | None:
  """`token_ids`' inverse as transformers writes it: one id, a list, or null."""
  return ids[0] if len(ids) == 1 else (list(ids) or None)


def whole(x: float) -> int | float:
  """x as an int when it is whole (transformers' configs type such fields int)."""
  return int(x) if float(x).is_integer() else x
