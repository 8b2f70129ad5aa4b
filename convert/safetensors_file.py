"""safetensors files read one tensor at a time with plain reads, never memory-mapped: a mapped shard
counts in the process's memory (RSS) for every page read until it is closed, which for a 5 GB
shard is 5 GB more than the one tensor a conversion holds (docs/memory.md).

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, offsets counted from its start.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from lminf_jax.errors import UserError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class TensorEntry(NamedTuple):
  """Where one tensor lies in its file: bytes [start, end) from the file's beginning."""

  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
  """The tensors of the file at `path`, in file order; UserError if it is truncated or corrupt."""
  def corrupt(why: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt: {why}")

  try:
    with open(path, "rb") as f:
      size = f.seek(0, 2)
      f.seek(0)
      head = f.read(8)
      if len(head) < 8:
        raise corrupt("no header")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise corrupt(f"a header of {n} bytes in a file of {size}")
      header = json.loads(f.read(n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise corrupt(f"its header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise corrupt("its header is not a JSON object")
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      kind, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
      raise corrupt(f"tensor {name} has no dtype, shape and data_offsets") from None
    if kind not in _DTYPES:
      raise UserError(f"{path}: tensor {name} has dtype {kind}, which lminf does not read "
                      f"({', '.join(_DTYPES)})")
    dtype = np.dtype(_DTYPES[kind])
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size - 8 - n
            and end - begin == math.prod(shape) * dtype.itemsize and min(shape, default=0) >= 0):
      raise corrupt(f"tensor {name}'s data_offsets {[begin, end]} do not hold {kind} {list(shape)}")
    entries[name] = TensorEntry(dtype, shape, 8 + n + begin, 8 + n + end)
  return dict(sorted(entries.items(), key=lambda item: item[1].start))


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of the file, each read into its own array."""
  entries = read_header(path)
  with open(path, "rb") as f:
    for name, entry in entries.items():
      array = np.empty(entry.shape, entry.dtype)
      f.seek(entry.start)
      if f.readinto(array.reshape(-1).view(np.uint8)) != entry.end - entry.start:
        raise UserError(f"{path} is truncated or corrupt: tensor {name} ends past the file")
      yield name, array
