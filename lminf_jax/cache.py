"""Fixed-size KV caches: starting-token slots plus a ring buffer, as pytrees of static shape.

`lambda` keeps n_global slots and an n_local ring, `streaming` n_sink slots and an n_recent
ring; `dense` is a ring of a chosen maximum length with no slots (feeding more tokens than it
holds is an error). Keys are stored before RoPE, with their positions and sequence indices, and
rotated by position *differences* when attended, so a stream of 10^8 tokens behaves exactly
like a short one. Cache memory never grows.

Feeding a chunk through the cache is `band_attention` with the ring (oldest first) as the key
context and the slots as starting keys: the same computation as the one-shot forward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.attention.banded import Keys, band_attention
from lminf_jax.attention.methods import band_rotation, band_shape
from lminf_jax.attention.specs import Dense, Lambda
from lminf_jax.errors import UserError


class LayerCache(NamedTuple):
  """One layer's cache; the model's cache stacks L of them (leading axis) for the layer scan."""

  slots: Keys  # [B, K, G, H] starting tokens, idx -1 while empty
  ring: Keys  # [B, K, W, H] the latest W tokens at slot idx % W, idx -1 while empty


class Cache(NamedTuple):
  layers: LayerCache  # every leaf with a leading L axis
  next_idx: jnp.ndarray  # [B] sequence index of the next real token


def cache_shape(spec, max_len: int | None = None) -> tuple[int, int]:
  """(starting slots, ring length) for a resolved spec; dense needs `max_len`."""
  if isinstance(spec, Dense):
    if not max_len:
      raise UserError("a dense cache needs max_len")
    return 0, max_len
  if isinstance(spec, Lambda) and (spec.top_k or not spec.mask):
    raise UserError("cached lambda supports neither top_k nor the no-mask ablation (both need every key)")
  return band_shape(spec)


def _empty_keys(batch: int, kv_heads: int, length: int, head_dim: int, dtype) -> Keys:
  shape = (batch, kv_heads, length, head_dim)
  return Keys(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
              jnp.zeros((batch, length), jnp.int32), jnp.full((batch, length), -1, jnp.int32))


def init_cache(config, spec, batch: int, max_len: int | None = None) -> Cache:
  """An empty cache for `batch` rows under the resolved attention `spec` (dense: `max_len` tokens)."""
  n_slots, ring = cache_shape(spec, max_len)
  dtype = jnp.dtype(config.dtype)
  layer = LayerCache(_empty_keys(batch, config.num_kv_heads, n_slots, config.head_dim, dtype),
                     _empty_keys(batch, config.num_kv_heads, ring, config.head_dim, dtype))
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (config.num_layers,) + x.shape), layer)
  return Cache(stacked, jnp.zeros((batch,), jnp.int32))


def chunk_indices(next_idx_b: jnp.ndarray, positions_bc: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sequence indices [B, C] of a chunk (negative positions = padding, idx -1) and the next index."""
  valid_bc = positions_bc >= 0
  idx_bc = next_idx_b[:, None] + jnp.cumsum(valid_bc, axis=1, dtype=jnp.int32) - 1
  return jnp.where(valid_bc, idx_bc, -1), next_idx_b + jnp.sum(valid_bc, axis=1, dtype=jnp.int32)


def attend_cached(q_bcnh, k_bckh, v_bckh, positions_bc, idx_bc, next_idx_b, layer: LayerCache, inv_freq_h, spec):
  """Attention of a chunk through one layer's cache: (out [B,C,N,H], updated LayerCache)."""
  n_slots, ring_len = layer.slots.idx_bl.shape[1], layer.ring.idx_bl.shape[1]
  window = ring_len if isinstance(spec, Dense) else band_shape(spec)[1]
  # The ring oldest first: slot (next_idx + w) % W holds the w-th oldest token.
  order_bw = (next_idx_b[:, None] + jnp.arange(ring_len, dtype=jnp.int32)) % ring_len
  ctx = _take(layer.ring, order_bw)
  new = Keys(jnp.swapaxes(k_bckh, 1, 2), jnp.swapaxes(v_bckh, 1, 2), positions_bc, idx_bc)
  keys = Keys(*(jnp.concatenate([a, b], axis=2 if a.ndim == 4 else 1) for a, b in zip(ctx, new)))
  # New tokens go to slot idx (if idx < n_slots) before attending (later queries of this chunk
  # may see them as starting tokens), and to ring slot idx % W after (only the last W of the
  # chunk: no two writes may hit one slot). Writes to out-of-range slots are dropped.
  slot_at = jnp.where((idx_bc >= 0) & (idx_bc < n_slots), idx_bc, n_slots)
  slots = _put(layer.slots, slot_at, new)
  out, _ = band_attention(q_bcnh, positions_bc, idx_bc, keys, slots, inv_freq_h, spec.chunk, spec.key_block, window,
                          band_rotation(spec))
  last_b = jnp.max(idx_bc, axis=1, keepdims=True)
  ring_at = jnp.where((idx_bc >= 0) & (idx_bc > last_b - ring_len), idx_bc % ring_len, ring_len)
  return out, LayerCache(slots, _put(layer.ring, ring_at, new))


def _take(keys: Keys, at_bw: jnp.ndarray) -> Keys:
  return Keys(jnp.take_along_axis(keys.k_bklh, at_bw[:, None, :, None], axis=2),
              jnp.take_along_axis(keys.v_bklh, at_bw[:, None, :, None], axis=2),
              jnp.take_along_axis(keys.pos_bl, at_bw, axis=1), jnp.take_along_axis(keys.idx_bl, at_bw, axis=1))


def _put(keys: Keys, at_bc: jnp.ndarray, new: Keys) -> Keys:
  """Writes new[:, c] to slot at_bc[:, c]; out-of-range slots are dropped."""
  b = jnp.arange(at_bc.shape[0])[:, None]
  return Keys(keys.k_bklh.at[b, :, at_bc].set(jnp.swapaxes(new.k_bklh, 1, 2), mode="drop"),
              keys.v_bklh.at[b, :, at_bc].set(jnp.swapaxes(new.v_bklh, 1, 2), mode="drop"),
              keys.pos_bl.at[b, at_bc].set(new.pos_bl, mode="drop"),
              keys.idx_bl.at[b, at_bc].set(new.idx_bl, mode="drop"))
