"""Attention method specs: frozen, hashable dataclasses passed as plain (static) arguments.

Every spec has `chunk` and `key_block`, the query-chunk length C and key-block length S of the
blockwise computation: memory and speed knobs that never change the result.
`n_local=None` / `n_recent=None` mean the model's training length (max_position_embeddings).
"""

from __future__ import annotations

import dataclasses

import jax

from lminf_jax.errors import UserError


def _check(spec, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
  for name in positive + non_negative:
    value = getattr(spec, name)
    bad = value is not None and (value <= 0 if name in positive else value < 0)
    if bad:
      raise UserError(f"{type(spec).__name__}.{name} must be {'positive' if name in positive else '>= 0'}, "
                      f"got {value}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Dense:
  """Ordinary causal attention (flash-style blockwise, O(T^2) time, O(T*C) memory)."""

  chunk: int = 512
  key_block: int = 512

  def __post_init__(self):
    _check(self, positive=("chunk", "key_block"))

  def resolve(self, max_position_embeddings: int) -> "Dense":
    return self


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Lambda:
  """LM-Infinite: n_global starting tokens seen at distance `limit` + an n_local window.

  Ablations of the paper's diagnosis: `mask=False` attends every far key (i-j >= n_local) at
  distance `limit` (O(T^2)); `distance_limit=False` keeps the mask but sees the starting
  tokens at their true distance. `top_k` adds, for layers >= top_k_from_layer and the last
  query of a forward, the top_k middle keys at distance top_k_insert_at.
  """

  n_global: int = 10
  n_local: int | None = None
  limit: int | None = None
  top_k: int | None = None
  top_k_from_layer: int = 4
  top_k_insert_at: int = 2048
  mask: bool = True
  distance_limit: bool = True
  chunk: int = 512
  key_block: int = 512

  def __post_init__(self):
    _check(self, positive=("n_local", "limit", "chunk", "key_block", "top_k"),
           non_negative=("n_global", "top_k_from_layer", "top_k_insert_at"))
    if self.top_k is not None and not self.mask:
      raise UserError("Lambda.top_k needs mask=True (without the mask every far key is attended already)")

  def resolve(self, max_position_embeddings: int) -> "Lambda":
    n_local = self.n_local or max_position_embeddings
    return dataclasses.replace(self, n_local=n_local, limit=self.limit or n_local)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Streaming:
  """StreamingLLM: n_sink attention sinks + the n_recent latest keys, positions inside the cache."""

  n_sink: int = 4
  n_recent: int | None = None
  chunk: int = 512
  key_block: int = 512

  def __post_init__(self):
    _check(self, positive=("n_recent", "chunk", "key_block"), non_negative=("n_sink",))

  def resolve(self, max_position_embeddings: int) -> "Streaming":
    return dataclasses.replace(self, n_recent=self.n_recent or max(1, max_position_embeddings - self.n_sink))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InfLLM:
  """InfLLM: n_init starting tokens + an n_local window + a memory of evicted tokens in blocks of
  block_size, of which each query chunk attends the top_k most relevant. `chunk` is part of the
  semantics here (retrieval happens once per chunk); capacity_blocks caps the block pool
  (None: as many blocks as the input forms)."""

  n_init: int = 128
  n_local: int | None = None
  block_size: int = 128
  repr_tokens: int = 4
  top_k: int = 16
  chunk: int = 512
  capacity_blocks: int | None = None
  key_block: int = 512

  def __post_init__(self):
    _check(self, positive=("n_local", "block_size", "repr_tokens", "top_k", "chunk", "key_block"),
           non_negative=("n_init", "capacity_blocks"))
    if self.repr_tokens > self.block_size:
      raise UserError(f"InfLLM.repr_tokens ({self.repr_tokens}) must be <= block_size ({self.block_size})")

  def resolve(self, max_position_embeddings: int) -> "InfLLM":
    return dataclasses.replace(self, n_local=self.n_local or max_position_embeddings)


ATTENTION_METHODS = {"dense": Dense, "lambda": Lambda, "streaming": Streaming, "infllm": InfLLM}


def resolve(spec, max_position_embeddings: int, sliding_window: int | None = None):
  """Fills model-dependent defaults (n_local=None -> the training length). On a model with a
  sliding window (Mistral v0.1: each query sees its last `sliding_window` keys, as in transformers),
  `Dense` is that window: Lambda with no starting tokens and n_local = sliding_window."""
  if type(spec) not in ATTENTION_METHODS.values():
    raise UserError(f"unknown attention method {spec!r}")
  if isinstance(spec, Dense) and sliding_window:
    spec = Lambda(n_global=0, n_local=sliding_window, chunk=spec.chunk, key_block=spec.key_block)
  return spec.resolve(max_position_embeddings)
