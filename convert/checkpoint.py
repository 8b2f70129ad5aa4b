"""Checkpoint dirs: Orbax params + `config.json` + tokenizer files, written atomically.

A checkpoint dir is written under a temporary sibling name and renamed into place only when
complete, so a failed or interrupted conversion never leaves a dir that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from lminf_jax.convert.hf import param_shapes
from lminf_jax.errors import UserError
from lminf_jax.models.config import LlamaConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_checkpoint(path: Path) -> bool:
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_checkpoint(out: Path, config: LlamaConfig, params: dict, tokenizer=None) -> Path:
  """Writes params (Orbax), config and tokenizer to `out`, which must not exist yet."""
  import orbax.checkpoint as ocp

  out = Path(out).absolute()
  if out.exists():
    raise UserError(f"output {out} already exists")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    # config.json last: together with params/ it marks the dir as complete.
    (tmp / CONFIG_FILE).write_text(json.dumps({"lminf_jax": config.to_dict()}, indent=2))
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_config(path: Path) -> LlamaConfig:
  try:
    return LlamaConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["lminf_jax"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{path / CONFIG_FILE} is not an lminf_jax checkpoint config: {e}") from None


def load_checkpoint(path: Path, dtype: str | None = None, sharding=None) -> tuple[LlamaConfig, dict]:
  """Restores (config, params). `dtype` casts the params. `sharding` is one Sharding for every
  array or a tree of them (e.g. `lminf_jax.sharding.param_shardings`): each host then reads
  only its shards, the full params never exist on one device."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if not is_checkpoint(path):
    raise UserError(f"{path} is not a checkpoint dir (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
  config = read_config(path)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  shapes = param_shapes(config)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(config.param_dtype), sharding=sh),
                        shapes, sharding)
  try:
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
  except Exception as e:
    raise UserError(f"cannot restore params from {path / PARAMS_DIR}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
  return config, params
