"""One jit-compiled training step: next-token cross-entropy through the inference model.

The loss is `lminf_jax.inference.forward.nll_from_hidden` over `Llama.hidden`: the same modules and
attention functions that inference runs, differentiated by `jax.grad`. Axis letters as in
`lminf_jax.models.llama`, plus A for gradient-accumulation microbatches.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from lminf_jax.attention import Dense
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import nll_from_hidden
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import Llama


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What a run trains and how. `train` is a regex searched in param paths such as
  'layers/attn/wq_dnh' ('attn/': attention projections only; '.*': everything)."""

  seq_len: int
  steps: int
  lr: float
  batch: int = 1
  accum: int = 1
  train: str = ".*"
  warmup_steps: int | None = None  # default: 10% of steps
  weight_decay: float = 0.01  # weight matrices and embeddings only, not norms or biases
  clip_norm: float = 1.0
  remat: bool = True
  bf16: bool = False  # bfloat16 compute, float32 master params
  seed: int = 0
  logits_chunk: int = 1024

  def __post_init__(self):
    if self.seq_len <= 1:
      raise UserError(f"seq-len must be at least 2 (a token and its successor), got {self.seq_len}")
    for name in ("steps", "batch", "accum"):
      if getattr(self, name) < 1:
        raise UserError(f"{name} must be positive, got {getattr(self, name)}")
    if not self.lr > 0:
      raise UserError(f"lr must be positive, got {self.lr}")
    try:
      re.compile(self.train)
    except re.error as e:
      raise UserError(f"--train {self.train!r} is not a regex: {e}") from None

  @property
  def sequences_per_step(self) -> int:
    return self.batch * self.accum

  @property
  def warmup(self) -> int:
    return self.steps // 10 if self.warmup_steps is None else self.warmup_steps


class TrainState(NamedTuple):
  params: dict  # float32 master params (nested, as the model takes them)
  opt_state: optax.OptState
  step: jnp.ndarray  # int32 []
  key: jnp.ndarray  # PRNG key data uint32 [2]: the data order


def param_path(path: tuple[str, ...]) -> str:
  return "/".join(path)


def trainable_paths(params: dict, pattern: str) -> frozenset[str]:
  """Param paths that `pattern` (re.search) selects; an error if it selects none."""
  paths = [param_path(p) for p in traverse_util.flatten_dict(params)]
  chosen = frozenset(p for p in paths if re.search(pattern, p))
  if not chosen:
    raise UserError(f"--train {pattern!r} matches no param (paths look like {', '.join(sorted(paths)[:4])}, ...)")
  return chosen


def _labels(params: dict, trainable: frozenset[str]) -> dict:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: "train" if param_path(p) in trainable else "frozen" for p in flat})


def schedule(settings: TrainSettings) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine decay to lr/10 at the last step."""
  warmup = min(settings.warmup, settings.steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, settings.lr, warmup, max(settings.steps, warmup + 1),
                                            settings.lr / 10)


def optimizer(settings: TrainSettings, params: dict, trainable: frozenset[str]) -> optax.GradientTransformation:
  """Global-norm clipping and AdamW on the trainable params; frozen params get a zero update
  and, through `optax.multi_transform`, no optimizer state."""
  decayed = traverse_util.unflatten_dict(
      {p: p[-1].startswith(("w", "embed")) for p in traverse_util.flatten_dict(params)})
  adamw = optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                      optax.adamw(schedule(settings), weight_decay=settings.weight_decay, mask=decayed))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               _labels(params, trainable))


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))


def sequence_loss(model: Llama, params: dict, tokens_bt: jnp.ndarray, attention, logits_chunk: int = 1024):
  """Mean next-token cross-entropy over tokens [B, T] (float32 scalar) under a resolved attention spec."""
  x_btd = model.apply({"params": params}, tokens_bt, None, attention, method=Llama.hidden)
  return nll_from_hidden(model, params, x_btd, tokens_bt, logits_chunk).mean()


def make_train_step(config: LlamaConfig, settings: TrainSettings, tx: optax.GradientTransformation,
                    trainable: frozenset[str], attention=Dense()) -> Callable:
  """`step(state, tokens [A, B, T]) -> (state, metrics)`, jit-compiled, the state donated.

  The gradient is taken only with respect to the trainable params; the A microbatches'
  gradients are averaged (a `lax.scan`) before one clipped AdamW update."""
  model = Llama(config.replace(dtype="bfloat16") if settings.bf16 else config, remat=settings.remat)
  spec = config.resolve_attention(attention)

  def loss(train_flat: dict, frozen_flat: dict, tokens_bt: jnp.ndarray) -> jnp.ndarray:
    params = traverse_util.unflatten_dict({**train_flat, **frozen_flat})
    return sequence_loss(model, params, tokens_bt, spec, settings.logits_chunk)

  def step(state: TrainState, tokens_abt: jnp.ndarray) -> tuple[TrainState, dict]:
    flat = traverse_util.flatten_dict(state.params)
    train_flat = {p: x for p, x in flat.items() if param_path(p) in trainable}
    frozen_flat = {p: x for p, x in flat.items() if param_path(p) not in trainable}

    def micro(total, tokens_bt):
      value, grads = jax.value_and_grad(loss)(train_flat, frozen_flat, tokens_bt)
      return jax.tree.map(jnp.add, total, (value, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, train_flat))
    (total_loss, grads), _ = jax.lax.scan(micro, zeros, tokens_abt)
    count = tokens_abt.shape[0]
    grads = jax.tree.map(lambda g: g / count, grads)
    all_grads = traverse_util.unflatten_dict({**grads, **{p: jnp.zeros_like(x) for p, x in frozen_flat.items()}})
    updates, opt_state = tx.update(all_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=total_loss / count, grad_norm=optax.tree.norm(grads), lr=schedule(settings)(state.step))
    return TrainState(params, opt_state, state.step + 1, state.key), metrics

  return jax.jit(step, donate_argnums=0)
