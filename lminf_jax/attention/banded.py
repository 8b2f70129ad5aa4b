"""Starting tokens + a sliding band: the O(T) core of LM-Infinite and StreamingLLM.

Query i attends (a) the band of keys with 0 <= i-j < window at true relative distance and
(b) the first `n_start` tokens that are not in its band, rotated as the method's `Rotation` says.
Each query chunk touches only the starting keys and the key blocks of its band:
O(T * (n_start + window + C)) time, O(C * (n_start + window + C)) memory per head.

`band_attention` is the core; its keys may begin with a context that precedes the queries
(a neighbouring shard's keys under sequence parallelism, or a cache), and its starting keys
are passed in, so the same code serves one device, many devices and caches.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention import ring
from lminf_jax.attention.blockwise import Keys
from lminf_jax.positional import Positional


@dataclasses.dataclass(frozen=True)
class AtDistance:
  """Starting keys seen at a fixed distance: the query rotated at `distance`, the keys unrotated
  (LM-Infinite's distance limit)."""

  distance: int

  def query_offsets(self, pos_bc, idx_bc, ref_b1):
    return jnp.full_like(pos_bc, self.distance)

  def key_offsets(self, pos_bg, idx_bg, ref_b1):
    return jnp.zeros_like(pos_bg)


@dataclasses.dataclass(frozen=True)
class InCache:
  """Positions inside the cache (StreamingLLM): a query at min(i, cap), a starting key at its index."""

  cap: int

  def query_offsets(self, pos_bc, idx_bc, ref_b1):
    return jnp.minimum(idx_bc, self.cap)

  def key_offsets(self, pos_bg, idx_bg, ref_b1):
    return idx_bg


@dataclasses.dataclass(frozen=True)
class TrueDistance:
  """Starting keys at their true distance (LM-Infinite's "mask without the limit" ablation)."""

  def query_offsets(self, pos_bc, idx_bc, ref_b1):
    return pos_bc - ref_b1

  def key_offsets(self, pos_bg, idx_bg, ref_b1):
    return pos_bg - ref_b1


Rotation = AtDistance | InCache | TrueDistance


class Band(NamedTuple):
  """A query sees the `n_start` first tokens (rotated by `rotation`) and its `window` latest keys."""

  n_start: int
  window: int
  rotation: Rotation


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
                      ref_b1: jnp.ndarray, starts: Keys, pe: Positional, window: int,
                      rotation: Rotation) -> bw.SoftmaxState:
  """Folds the starting keys a query does not see in its band (distance >= window) into its softmax."""
  if not starts.idx_bl.shape[1]:
    return state
  q_far = bw.query_tile(q_bcnh, rotation.query_offsets(pos_bc, idx_bc, ref_b1), pe, starts.k_bklh.shape[1])
  k_far = bw.key_tile(starts.k_bklh, rotation.key_offsets(starts.pos_bl, starts.idx_bl, ref_b1), pe)
  mask_bcg = bw.visible(idx_bc, starts.idx_bl, min_dist=window)
  return bw.update(state, bw.scores(q_far, k_far, pe), starts.v_bklh, mask_bcg)


def band_attention(q_btnh: jnp.ndarray, pos_bt: jnp.ndarray, idx_bt: jnp.ndarray, keys: Keys, starts: Keys,
                   pe: Positional, chunk: int, key_block: int, window: int, rotation: Rotation):
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
    q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, pe, kv)
    state = bw.init_state(q_near.x)
    state = add_starting_keys(state, q_bcnh, pos_bc, idx_bc, ref_b1, starts, pe, window, rotation)

    def key_step(state, kb):
      start = first_band + ci * c + kb * s
      idx_bs = jax.lax.dynamic_slice_in_dim(keys.idx_bl, start, s, axis=1)

      def scores_and_values():
        k_rot, _, v_bksh = bw.key_block(keys.k_bklh, keys.v_bklh, keys.pos_bl, start, s, ref_b1, pe)
        return bw.scores(q_near, k_rot, pe), v_bksh

      return bw.fold_block(state, scores_and_values, idx_bc, idx_bs, window), None

    state, _ = jax.lax.scan(key_step, state, jnp.arange(band_len // s))
    return bw.finish(state, c, q_btnh.dtype)

  return bw.over_query_chunks(chunk_step, q_btnh, pos_bt, idx_bt, chunk)


def sink_and_band(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                  pe: Positional, chunk: int, key_block: int, band: Band):
  """One device, no context: q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N])."""
  positions_bt = positions_bt.astype(jnp.int32)
  idx_bt = bw.sequence_index(positions_bt)
  keys = Keys(jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt, idx_bt)
  return band_attention(q_btnh, positions_bt, idx_bt, keys, starting_keys(keys, min(band.n_start, q_btnh.shape[1])),
                        pe, chunk, key_block, band.window, band.rotation)


def attend_one(q_b1nh: jnp.ndarray, new: Keys, slots: Keys, ring_keys: Keys, pe: Positional, window: int,
               rotation: Rotation) -> jnp.ndarray:
  """One query per row [B, 1, N, H] over an anchored ring in place (`ring`), its own key `new` and
  the starting slots: [B, 1, N, H]."""
  kv_heads = ring_keys.k_bklh.shape[1]
  pos_b1, idx_b1 = new.pos_bl, new.idx_bl
  state = bw.init_state(bw.tile_rows(q_b1nh, kv_heads))
  state = add_starting_keys(state, q_b1nh, pos_b1, idx_b1, pos_b1, slots, pe, window, rotation)
  state = bw.update(state, ring.ring_scores(q_b1nh, pos_b1, ring_keys, pe), ring_keys.v_bklh,
                    bw.visible(idx_b1, ring_keys.idx_bl, window))
  state = bw.update(state, ring.own_key_scores(q_b1nh, new, pe), new.v_bklh, (idx_b1 >= 0)[:, :, None])
  return bw.finish(state, 1, q_b1nh.dtype)[0]
