"""Checkpoint dirs: Orbax params + `config.json` + tokenizer files, written atomically.

A checkpoint dir is written under a temporary sibling name and renamed into place only when
complete, so a failed or interrupted conversion never leaves a dir that looks valid, and the
temporary is removed (`lminf_jax.util.atomic`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lminf_jax.util.atomic import atomic_dir
from lminf_jax.errors import UserError, without_closed_loop_reports
from lminf_jax.util.files import read_json_object
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.params import abstract_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_checkpoint(path: Path) -> bool:
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def _handler():
  """Orbax's pytree handler, writing host arrays as they are: no deep copy of the params first (they
  are ours and outlive the save) and no compression (whose buffers held most of a second copy of
  the params at once; bfloat16 weights hardly compress): writing adds no copy (docs/memory.md).
  A checkpoint written with compression still restores."""
  import numpy as np
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  registry = type_handlers.create_type_handler_registry(
      (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, type_handlers.ArrayHandler()))
  return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def save_checkpoint(out: Path, config: LlamaConfig, params: dict, tokenizer=None) -> Path:
  """Writes params (Orbax), config and tokenizer to `out`, which must not exist yet (atomically:
  `lminf_jax.util.atomic.atomic_dir`)."""
  import orbax.checkpoint as ocp

  out = Path(out).absolute()
  with atomic_dir(out) as tmp:
    # A synchronous checkpointer: its writes are done when save returns, also on an error, so that
    # removing the temporary dir never races them.
    with ocp.Checkpointer(_handler()) as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    # config.json last: together with params/ it marks the dir as complete.
    (tmp / CONFIG_FILE).write_text(json.dumps({"lminf_jax": config.to_dict()}, indent=2))
  return out


def read_config(path: Path) -> LlamaConfig:
  file = path / CONFIG_FILE
  fields = read_json_object(file).get("lminf_jax")
  if not isinstance(fields, dict):
    raise UserError(f"{file} is not an lminf_jax checkpoint config: no \"lminf_jax\" object")
  try:
    return LlamaConfig.from_dict(fields)
  except UserError as e:
    raise UserError(f"{file}: {e}") from None
  except TypeError as e:  # unknown or missing fields
    raise UserError(f"{file} is not an lminf_jax checkpoint config: {e}") from None


def load_checkpoint(path: Path, dtype: str | None = None, sharding=None) -> tuple[LlamaConfig, dict]:
  """Restores (config, params). `dtype` casts the params. `sharding` is one Sharding for every
  array or a tree of them (e.g. `lminf_jax.models.params.param_shardings`): each host then reads
  only its shards, the full params never exist on one device."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if not is_checkpoint(path):
    raise UserError(f"{path} is not a checkpoint dir (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
  config = read_config(path)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  shapes = abstract_params(config)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(config.param_dtype), sharding=sh),
                        shapes, sharding)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = without_closed_loop_reports(previous_hook)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      params = jax.tree_util.tree_map_with_path(lambda keys, leaf: _restore_leaf(checkpointer, path / PARAMS_DIR,
                                                                                 keys, leaf), target)
  except Exception as e:  # (the hook stays: reads still in flight report later)
    raise UserError(f"cannot restore params from {path / PARAMS_DIR}: truncated or corrupt ({_summary(e)})") from None
  sys.unraisablehook = previous_hook
  return config, params


def _restore_leaf(checkpointer, path: Path, keys: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
  """One parameter of the checkpoint at `path` (a partial restore): restoring the params a leaf at a
  time, the reads' buffers hold one leaf, not the whole params at once (docs/memory.md)."""
  import orbax.checkpoint as ocp

  item = leaf
  for key in reversed(keys):
    item = {key.key: item}
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item, restore_args, partial_restore=True))
  for key in keys:
    restored = restored[key.key]
  return jax.block_until_ready(restored)


def _summary(error: Exception, limit: int = 200) -> str:
  """'Type: first line of the message', cut to `limit` characters (tensorstore's run to 2 KB)."""
  line = (str(error).splitlines() or [""])[0]
  return f"{type(error).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"

