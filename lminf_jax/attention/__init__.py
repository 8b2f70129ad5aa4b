"""Attention methods as pure functions over arrays, selected by a frozen spec.

`attend(q, k, v, positions, inv_freq, spec, layer)` is the one entry point the model calls.
"""

from __future__ import annotations

import jax.numpy as jnp

from lminf_jax.attention.methods import METHOD_FUNCTIONS
from lminf_jax.attention.specs import ATTENTION_METHODS, Dense, InfLLM, Lambda, Streaming, resolve

__all__ = ["ATTENTION_METHODS", "Dense", "InfLLM", "Lambda", "Streaming", "attend", "resolve"]


def attend(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
           inv_freq_h: jnp.ndarray, spec, layer: jnp.ndarray | int = 0) -> jnp.ndarray:
  """Attention of method `spec` (resolved: no None lengths). q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  q, k are projections before RoPE; `positions` [B, T] are RoPE positions, negative for left
  padding; `layer` is the layer index (a traced scalar inside the layer scan).
  """
  if spec.resolve(0) != spec:  # resolving is a no-op exactly when every length is set
    raise ValueError(f"unresolved attention spec {spec}: call resolve(spec, max_position_embeddings) first")
  return METHOD_FUNCTIONS[type(spec)](q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec, layer)
