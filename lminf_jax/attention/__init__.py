"""Attention methods as pure functions over arrays, selected by a frozen spec (`AttentionMethod`).

`attend(q, k, v, positions, pe, spec, layer)` is the one entry point the model calls for
a one-shot forward (`pe`: `Rotary` or `ALiBi`, lminf_jax.positional); lminf_jax.cache calls a spec's cached attention. A new method is one
subclass of `AttentionMethod` (lminf_jax.attention.method), in any module (and of `Tiling`, for a
blockwise method's chunk, key_block and kernel options).
"""

from __future__ import annotations

import jax.numpy as jnp

from lminf_jax.attention.band_method import BandMethod
from lminf_jax.attention.banded import AtDistance, Band, InCache, TrueDistance
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.dca import DCA
from lminf_jax.attention.dense import Dense, SlidingWindow
from lminf_jax.attention.infllm import InfLLM
from lminf_jax.attention.lminfinite import Lambda
from lminf_jax.attention.method import AttentionMethod, CachedLayer, CacheLayout, Tiling, option
from lminf_jax.attention.registry import ATTENTION_METHODS, method_class, resolve
from lminf_jax.attention.remapped import RemappedMethod
from lminf_jax.attention.selfextend import SelfExtend
from lminf_jax.attention.streaming import Streaming
from lminf_jax.errors import UserError
from lminf_jax.positional import ALiBi, Positional, Rotary
from lminf_jax.sharding import mesh_axis_size

__all__ = ["ALiBi", "ATTENTION_METHODS", "AtDistance", "AttentionMethod", "Band", "BandMethod", "CacheLayout",
           "CachedLayer", "DCA", "Dense", "InCache", "InfLLM", "Keys", "Lambda", "Positional", "RemappedMethod", "Rotary", "SelfExtend", "SlidingWindow",
           "Streaming", "Tiling", "TrueDistance", "attend", "method_class", "option", "resolve"]


def attend(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
           pe: Positional, spec: AttentionMethod, layer: jnp.ndarray | int = 0) -> jnp.ndarray:
  """Attention of method `spec` (resolved). q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  q, k are projections before RoPE; `positions` [B, T] are positions, negative for left
  padding; `pe` how they enter the logits (`Rotary` or `ALiBi`, with the model's soft-cap);
  `layer` is the layer index (a traced scalar inside the layer scan).
  """
  if not spec.resolved:
    raise ValueError(f"unresolved attention spec {spec}: call resolve(spec, max_position_embeddings) first")
  if mesh_axis_size("sequence") > 1 and not spec.sequence_parallel:
    raise UserError(f"{spec.name} does not support sequence parallelism (a mesh with a sequence axis); "
                    f"run it without one")
  return spec.attend(q_btnh, k_btkh, v_btkh, positions_bt, pe, layer)
