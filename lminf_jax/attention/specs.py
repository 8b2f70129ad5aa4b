"""Attention method specs: frozen, hashable dataclasses passed as plain arguments.

Every spec has `chunk`, the query-chunk length C of the blockwise computation (a memory and
speed knob for dense / lambda / streaming; it never changes their result).
"""

from __future__ import annotations

import dataclasses

import jax

from lminf_jax.errors import UserError


def _check_positive(spec, *names: str) -> None:
  for name in names:
    value = getattr(spec, name)
    if value is not None and value <= 0:
      raise UserError(f"{type(spec).__name__}.{name} must be positive, got {value}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Dense:
  """Ordinary causal attention (flash-style blockwise, O(T^2) time, O(T*C) memory)."""

  chunk: int = 512

  def __post_init__(self):
    _check_positive(self, "chunk")

  def resolve(self, max_position_embeddings: int) -> "Dense":
    return self


ATTENTION_METHODS = {"dense": Dense}


def resolve(spec, max_position_embeddings: int):
  """Fills model-dependent defaults (e.g. n_local=None -> the training length)."""
  if type(spec) not in ATTENTION_METHODS.values():
    raise UserError(f"unknown attention method {spec!r}")
  return spec.resolve(max_position_embeddings)
