"""Causal attention over every earlier key block: ordinary dense attention (the `Dense` method),
and LM-Infinite's "distance limit without the mask" ablation (all far keys attended at distance
`limit`). On a model with a sliding window (Mistral v0.1), `Dense` resolves to `SlidingWindow`.

Flash-style: scan over query chunks, online softmax over key blocks; blocks in a chunk's
future are skipped with `lax.cond`. O(T^2) time, O(T*C) memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.band_method import BandMethod
from lminf_jax.attention.banded import Band, TrueDistance
from lminf_jax.attention.method import CacheLayout, option
from lminf_jax.errors import UserError
from lminf_jax.positional import Positional
from lminf_jax.sharding import mesh_axis_size, warn_dense_all_gather

@dataclasses.dataclass(frozen=True)
class Dense(BandMethod):
  """Ordinary causal attention (flash-style blockwise, O(T^2) time, O(T*C) memory). Its cache is a
  ring of max_len tokens that refuses more."""

  def band(self) -> Band:
    return Band(0, bw.FUTURE, TrueDistance())

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None):
    """On a model with a sliding window, each query sees its last `sliding_window` keys, as in transformers."""
    if sliding_window:
      return SlidingWindow(window=sliding_window, chunk=self.chunk, key_block=self.key_block, kernel=self.kernel)
    return self

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    if mesh_axis_size("sequence") > 1:
      warn_dense_all_gather()
      return self.xla_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)[0]
    return self.band_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)[0]

  def xla_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe):
    return causal_attention(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.chunk, self.key_block)

  def window_tokens(self) -> int:
    return 0

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    if not max_len:
      raise UserError("a dense cache needs max_len")
    return CacheLayout(0, max_len)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(BandMethod):
  """A model's own sliding window: each query sees its last `window` keys at true distance."""

  window: int = option(4096, "keys each query sees, its own included", minimum=1)

  def band(self) -> Band:
    return Band(0, self.window, TrueDistance())


def causal_attention(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                     pe: Positional, chunk: int, key_block: int, far: tuple[int, int] | None = None):
  """Causal attention; q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N]).

  Keys at true relative distance, except with `far=(window, limit)`: keys with i-j >= window
  are seen at distance `limit` (query rotated at `limit`, key unrotated).
  """
  t, kv = q_btnh.shape[1], k_btkh.shape[2]
  positions_bt = positions_bt.astype(jnp.int32)
  idx_bt = bw.sequence_index(positions_bt)
  # Keys in [B, K, T, H] blocks of S; padding keys lie in every query's future.
  s = min(key_block, t)
  pad = -t % s
  k_bkth, v_bkth = (jnp.swapaxes(bw.pad_axis(x, 1, 0, pad), 1, 2) for x in (k_btkh, v_btkh))
  key_pos_bt, key_idx_bt = bw.pad_axis(positions_bt, 1, 0, pad), bw.pad_axis(idx_bt, 1, 0, pad, bw.FUTURE)

  def chunk_step(ci, q_bcnh, pos_bc, idx_bc):
    b, c = q_bcnh.shape[:2]
    ref_b1 = pos_bc[:, -1:]
    q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, pe, kv)
    if far is not None:
      q_far = bw.query_tile(q_bcnh, jnp.full_like(pos_bc, far[1]), pe, kv)

    def key_step(state, kb):
      idx_bs = jax.lax.dynamic_slice_in_dim(key_idx_bt, kb * s, s, axis=1)

      def scores_and_values():
        k_rot, k_raw, v_bksh = bw.key_block(k_bkth, v_bkth, key_pos_bt, kb * s, s, ref_b1, pe)
        s_bkms = bw.scores(q_near, k_rot, pe)
        if far is not None:
          near_bcs = idx_bc[:, :, None] - idx_bs[:, None, :] < far[0]
          near_b1cs = jnp.tile(near_bcs[:, None], (1, 1, q_near.x.shape[2] // c, 1))
          s_bkms = jnp.where(near_b1cs, s_bkms, bw.scores(q_far, k_raw, pe))
        return s_bkms, v_bksh

      return bw.fold_block(state, scores_and_values, idx_bc, idx_bs), None

    init = bw.init_state(q_near.x)
    state, _ = jax.lax.scan(key_step, init, jnp.arange(key_idx_bt.shape[1] // s))
    return bw.finish(state, c, q_btnh.dtype)

  return bw.over_query_chunks(chunk_step, q_btnh, positions_bt, idx_bt, chunk)
