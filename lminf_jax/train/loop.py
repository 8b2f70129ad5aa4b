"""The fine-tuning run: steps, Orbax training checkpoints, resume, JSON log and loss plot.

An output dir holds
  checkpoints/<step>/  Orbax `CheckpointManager` steps: the TrainState (params, optimizer
                       state, step, PRNG key) and JSON meta (data position, settings, history);
                       a save is written to a temporary dir and renamed only when complete,
                       so an interrupted save never replaces the latest good step;
  final/               the trained params as an ordinary checkpoint dir (every command loads it);
  log.json, loss.png   the loss history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lminf_jax.util.atomic import atomic_file, disk_full
from lminf_jax.attention import Dense
from lminf_jax.convert.checkpoint import save_checkpoint
from lminf_jax.errors import UserError
from lminf_jax.models.config import LlamaConfig
from lminf_jax.sharding import logical_spec
from lminf_jax.train.data import TokenWindows
from lminf_jax.train.step import TrainSettings, TrainState, init_state, make_train_step, optimizer, trainable_paths

CHECKPOINTS, FINAL, LOG, PLOT = "checkpoints", "final", "log.json", "loss.png"


def _manager(directory: Path, keep: int):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


def _settings_json(settings: TrainSettings, attention) -> dict:
  return dict(dataclasses.asdict(settings), attention=repr(attention))


def finetune(config: LlamaConfig, params: dict, ids: np.ndarray, settings: TrainSettings, out: Path,
             attention=Dense(), *, resume: bool = False, save_every: int | None = None, keep: int = 3,
             tokenizer=None, mesh=None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
  """Trains `params` on token ids [N]; returns the history (one dict per step, resumed steps included).

  Saves a training checkpoint every `save_every` steps and at the last step, keeping `keep`.
  `resume` continues from the latest one exactly: the same batches, the same losses bit for bit.
  `on_step(record)` is called after every step (a progress bar, say). `params` are donated to
  the first step: the caller's arrays are deleted."""
  out = Path(out)
  windows = TokenWindows(ids, settings.seq_len)
  trainable = trainable_paths(params, settings.train)
  tx = optimizer(settings, params, trainable)
  if resume and not (out / CHECKPOINTS).is_dir():
    raise UserError(f"--resume: no training checkpoint in {out / CHECKPOINTS}")
  out.mkdir(parents=True, exist_ok=True)
  expected = _settings_json(settings, attention)
  step_fn = make_train_step(config, settings, tx, trainable, attention)
  save_every = save_every or settings.steps
  shape = (settings.accum, settings.batch)
  tokens_per_step = settings.sequences_per_step * settings.seq_len
  on_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  # Leaving the manager waits for the saves in flight (also on an error or Ctrl-C).
  with _manager(out / CHECKPOINTS, keep) as manager, on_mesh:
    state = _fresh_state(params, tx, settings.seed, mesh)
    latest = manager.latest_step()
    if resume:
      if latest is None:
        raise UserError(f"--resume: no training checkpoint in {out / CHECKPOINTS}")
      state, meta = _restore(manager, latest, state)
      if meta["settings"] != expected:
        changed = sorted(k for k in expected if meta["settings"].get(k) != expected[k])
        raise UserError(f"--resume: the checkpoint in {out} was trained with other settings ({', '.join(changed)})")
      position, history = meta["position"], meta["history"]
    elif latest is not None:
      raise UserError(f"{out / CHECKPOINTS} already holds training checkpoints: pass --resume or choose another --out")
    else:
      position, history = 0, []
    for step in range(int(state.step), settings.steps):
      tokens = _place(windows.batch(np.asarray(state.key), position, shape), mesh)
      start = time.perf_counter()
      state, metrics = step_fn(state, tokens)
      record = dict(step=step + 1, **{k: float(v) for k, v in metrics.items()})
      seconds = time.perf_counter() - start
      position += settings.sequences_per_step
      history.append(dict(record, seconds=seconds, tokens_per_s=tokens_per_step / seconds))
      if on_step is not None:
        on_step(history[-1])
      if (step + 1) % save_every == 0 or step + 1 == settings.steps:
        _save(manager, out / CHECKPOINTS, step + 1, state, dict(position=position, settings=expected,
                                                                history=history))
        _write_log(out, history, expected)  # after the commit: the log records only committed steps
  if not (out / FINAL).exists():
    save_checkpoint(out / FINAL, config, jax.device_get(state.params), tokenizer)
  return history


def _place(tokens_abt: np.ndarray, mesh):
  if mesh is None:
    return tokens_abt
  return jax.device_put(tokens_abt, NamedSharding(mesh, logical_spec((None, "batch", "length"), tokens_abt.shape,
                                                                     mesh)))


def _save(manager, directory: Path, step: int, state: TrainState, meta: dict) -> None:
  """Saves `step` and waits for its commit. On a failure (a full disk) the step's temporary dirs
  are removed; after a kill, the next run's manager removes them (`cleanup_tmp_directories`)."""
  import orbax.checkpoint as ocp

  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  except Exception as e:
    for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(tmp, ignore_errors=True)
    if disk_full(e):
      raise UserError(f"no space left on device while writing {directory / str(step)}") from None
    raise


def _fresh_state(params: dict, tx, seed: int, mesh) -> TrainState:
  """A new TrainState; on a mesh, what is not sharded like the params (step, key) is replicated."""
  state = init_state(params, tx, seed)
  if mesh is None:
    return state
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)


def _restore(manager, step: int, fresh: TrainState) -> tuple[TrainState, dict]:
  """(TrainState, meta) of `step`, restored into the shapes, dtypes and shardings of `fresh`."""
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh._asdict())
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           meta=ocp.args.JsonRestore()))
  return TrainState(**restored["state"]), restored["meta"]


def _write_log(out: Path, history: list[dict], settings: dict) -> None:
  """log.json and loss.png, each written atomically (`lminf_jax.util.atomic`)."""
  with atomic_file(out / LOG) as tmp:
    tmp.write_text(json.dumps(dict(settings=settings, history=history), indent=2))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["step"] for r in history], [r["loss"] for r in history], marker="o", markersize=2)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (mean NLL)")
  ax.set_title(f"seq-len {settings['seq_len']}, {settings['attention']}, train {settings['train']!r}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  try:
    with atomic_file(out / PLOT) as tmp:
      fig.savefig(tmp, dpi=120)
  finally:
    plt.close(fig)
