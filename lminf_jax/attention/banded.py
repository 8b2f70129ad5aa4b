"""Starting tokens + a sliding band: the O(T) core of LM-Infinite and StreamingLLM.

Query i attends (a) the band of keys with 0 <= i-j < window at true relative distance and
(b) the first `n_start` tokens that are not in its band, rotated as the method says.
Each query chunk touches only the starting keys and the key blocks of its band:
O(T * (n_start + window + C)) time, O(C * (n_start + window + C)) memory per head.

`band_attention` is the core; its keys may begin with a context that precedes the queries
(a neighbouring shard's keys under sequence parallelism, or a cache), and its starting keys
are passed in, so the same code serves one device, many devices and caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.rope import apply_rope

# (positions [B,C], idx [B,C] of the queries, ref [B,1]) -> query RoPE offsets [B,C] for starting keys;
# (positions [B,G], idx [B,G] of the starting keys, ref [B,1]) -> their key RoPE offsets [B,G].
StartRotation = tuple[Callable, Callable]


class Keys(NamedTuple):
  """Keys and values [B, K, L, H] (before RoPE) with RoPE positions and sequence indices [B, L]
  (idx < 0: not a key)."""

  k_bklh: jnp.ndarray
  v_bklh: jnp.ndarray
  pos_bl: jnp.ndarray
  idx_bl: jnp.ndarray

  def pad(self, before: int, after: int) -> "Keys":
    """Adds invalid slots: idx -1 before, FUTURE after (in every query's future)."""
    return Keys(bw.pad_axis(self.k_bklh, 2, before, after), bw.pad_axis(self.v_bklh, 2, before, after),
                bw.pad_axis(self.pos_bl, 1, before, after),
                bw.pad_axis(bw.pad_axis(self.idx_bl, 1, before, 0, -1), 1, 0, after, bw.FUTURE))


def starting_keys(keys: Keys, n_start: int) -> Keys:
  """Each row's first n_start real tokens of `keys` (rows are left-padded); idx -1 where a row is shorter."""
  length = keys.idx_bl.shape[1]
  first_b = -keys.idx_bl[:, 0]
  start_idx_bg = jnp.broadcast_to(jnp.arange(n_start, dtype=jnp.int32), (first_b.shape[0], n_start))
  gather_bg = jnp.minimum(first_b[:, None] + start_idx_bg, length - 1)
  k_bkgh, v_bkgh = (jnp.take_along_axis(x, gather_bg[:, None, :, None], axis=2) for x in (keys.k_bklh, keys.v_bklh))
  exists_bg = first_b[:, None] + start_idx_bg < length
  return Keys(k_bkgh, v_bkgh, jnp.take_along_axis(keys.pos_bl, gather_bg, axis=1),
              jnp.where(exists_bg, start_idx_bg, -1))


def add_starting_keys(state: bw.SoftmaxState, q_bcnh: jnp.ndarray, pos_bc: jnp.ndarray, idx_bc: jnp.ndarray,
                      ref_b1: jnp.ndarray, starts: Keys, inv_freq_h: jnp.ndarray, window: int,
                      start_rotation: StartRotation) -> bw.SoftmaxState:
  """Folds the starting keys a query does not see in its band (distance >= window) into its softmax."""
  if not starts.idx_bl.shape[1]:
    return state
  q_offsets, k_offsets = start_rotation
  q_far = bw.query_tile(q_bcnh, q_offsets(pos_bc, idx_bc, ref_b1), inv_freq_h, starts.k_bklh.shape[1])
  k_far = apply_rope(starts.k_bklh, k_offsets(starts.pos_bl, starts.idx_bl, ref_b1)[:, None], inv_freq_h)
  mask_bcg = (idx_bc[:, :, None] - starts.idx_bl[:, None, :] >= window) & (starts.idx_bl >= 0)[:, None, :]
  return bw.update(state, bw.scores(q_far, k_far), starts.v_bklh, mask_bcg)


def band_attention(q_btnh: jnp.ndarray, pos_bt: jnp.ndarray, idx_bt: jnp.ndarray, keys: Keys, starts: Keys,
                   inv_freq_h: jnp.ndarray, chunk: int, key_block: int, window: int, start_rotation: StartRotation):
  """Queries q [B,T,N,H] (positions, idx [B,T]) over `keys` = a context of L-T keys followed by the
  queries' own T keys, plus `starts`. Returns (out [B,T,N,H], lse [B,T,N])."""
  b, t, _, _ = q_btnh.shape
  kv = keys.k_bklh.shape[1]
  lead = keys.idx_bl.shape[1] - t
  c = min(chunk, t)
  pad = -t % c
  # Chunk ci's band: the band_len keys before its end, in blocks of S; enough slots before the
  # first chunk that band starts are never negative.
  s = min(key_block, window - 1 + c)
  band_len = -(-(window - 1 + c) // s) * s
  extra = max(0, band_len - c - lead)
  keys = keys.pad(extra, pad)
  first_band = lead + extra + c - band_len

  def chunk_step(ci, q_bcnh, pos_bc, idx_bc):
    ref_b1 = pos_bc[:, -1:]
    q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, inv_freq_h, kv)
    state = bw.init_state(b, kv, q_near.shape[2], q_near.shape[3])
    state = add_starting_keys(state, q_bcnh, pos_bc, idx_bc, ref_b1, starts, inv_freq_h, window, start_rotation)

    def key_step(state, kb):
      start = first_band + ci * c + kb * s
      idx_bs = jax.lax.dynamic_slice_in_dim(keys.idx_bl, start, s, axis=1)

      def scores_and_values():
        k_rot, _, v_bksh = bw.key_block(keys.k_bklh, keys.v_bklh, keys.pos_bl, start, s, ref_b1, inv_freq_h)
        return bw.scores(q_near, k_rot), v_bksh

      return bw.fold_block(state, scores_and_values, idx_bc, idx_bs, window), None

    state, _ = jax.lax.scan(key_step, state, jnp.arange(band_len // s))
    return bw.finish(state, c, q_btnh.dtype)

  return bw.over_query_chunks(chunk_step, q_btnh, pos_bt, idx_bt, chunk)


def sink_and_band(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                  inv_freq_h: jnp.ndarray, chunk: int, key_block: int, n_start: int, window: int,
                  start_rotation: StartRotation):
  """One device, no context: q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N])."""
  positions_bt = positions_bt.astype(jnp.int32)
  idx_bt = bw.sequence_index(positions_bt)
  keys = Keys(jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt, idx_bt)
  return band_attention(q_btnh, positions_bt, idx_bt, keys, starting_keys(keys, min(n_start, q_btnh.shape[1])),
                        inv_freq_h, chunk, key_block, window, start_rotation)
