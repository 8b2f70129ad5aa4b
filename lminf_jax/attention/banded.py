"""Starting tokens + a sliding band: the O(T) core of LM-Infinite and StreamingLLM.

Query i attends (a) the band of keys with 0 <= i-j < window at true relative distance and
(b) the first `n_start` tokens that are not in its band, rotated as the method says.
Each query chunk touches only the n_start starting keys and the key blocks of its band:
O(T * (n_start + window + C)) time, O(C * (n_start + window + C)) memory per head.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.rope import apply_rope

# (positions [B,C], idx [B,C] of the queries, ref [B,1]) -> query RoPE offsets [B,C] for starting keys;
# (positions [B,G], idx [B,G] of the starting keys, ref [B,1]) -> their key RoPE offsets [B,G].
StartRotation = tuple[Callable, Callable]


def sink_and_band(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                  inv_freq_h: jnp.ndarray, chunk: int, key_block: int, n_start: int, window: int,
                  start_rotation: StartRotation):
  """q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N])."""
  p = bw.pad_inputs(q_btnh, k_btkh, v_btkh, positions_bt, chunk)
  c, kv = p.chunk, k_btkh.shape[2]
  n_start = min(n_start, p.length)
  # Chunk ci's band: the band_len keys before its end, [ci*C + C - band_len, ci*C + C), in blocks of S.
  s = min(key_block, window - 1 + c)
  band_len = -(-(window - 1 + c) // s) * s
  lead = band_len - c  # invalid slots put before the sequence, so band starts are never negative

  # Starting keys: each row's first n_start real tokens (rows are left-padded).
  first_b = -p.idx_bt[:, 0]
  start_idx_bg = jnp.broadcast_to(jnp.arange(n_start, dtype=jnp.int32), (p.idx_bt.shape[0], n_start))
  gather_bg = jnp.minimum(first_b[:, None] + start_idx_bg, p.length - 1)
  k_start, v_start = (jnp.take_along_axis(x, gather_bg[:, None, :, None], axis=2) for x in (p.k_bkth, p.v_bkth))
  pos_start_bg = jnp.take_along_axis(p.positions_bt, gather_bg, axis=1)
  start_exists_bg = first_b[:, None] + start_idx_bg < p.length

  k_band, v_band = (bw.pad_axis(x, 2, lead, 0) for x in (p.k_bkth, p.v_bkth))
  pos_band = bw.pad_axis(p.positions_bt, 1, lead, 0)
  idx_band = bw.pad_axis(p.idx_bt, 1, lead, 0, -1)

  def chunk_step(_, xs):
    ci, q_bcnh, pos_bc, idx_bc = xs
    b = q_bcnh.shape[0]
    ref_b1 = pos_bc[:, -1:]
    q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, inv_freq_h, kv)
    state = bw.init_state(b, kv, q_near.shape[2], q_near.shape[3])
    if n_start:
      q_offsets, k_offsets = start_rotation
      q_far = bw.query_tile(q_bcnh, q_offsets(pos_bc, idx_bc, ref_b1), inv_freq_h, kv)
      k_far = apply_rope(k_start, k_offsets(pos_start_bg, start_idx_bg, ref_b1)[:, None], inv_freq_h)
      mask_bcg = (idx_bc[:, :, None] - start_idx_bg[:, None, :] >= window) & start_exists_bg[:, None, :]
      state = bw.update(state, bw.scores(q_far, k_far), v_start, mask_bcg)

    def fold(state, kb):
      k_rot, _, v_bksh, idx_bs = bw.key_block(k_band, v_band, pos_band, idx_band, ci * c + kb * s, s, ref_b1,
                                              inv_freq_h)
      dist_bcs = idx_bc[:, :, None] - idx_bs[:, None, :]
      mask_bcs = (dist_bcs >= 0) & (dist_bcs < window) & (idx_bs >= 0)[:, None, :]
      return bw.update(state, bw.scores(q_near, k_rot), v_bksh, mask_bcs)

    def key_step(state, kb):  # blocks wholly before the sequence start are skipped
      return jax.lax.cond(ci * c + (kb + 1) * s > lead, fold, lambda st, _: st, state, kb), None

    state, _ = jax.lax.scan(key_step, state, jnp.arange(band_len // s))
    return None, bw.finish(state, c, q_btnh.dtype)

  _, (o_nbcnh, lse_nbcn) = jax.lax.scan(jax.checkpoint(chunk_step), None, p.query_chunks())
  return bw.unsplit_chunks(o_nbcnh, p.length), bw.unsplit_chunks(lse_nbcn, p.length)
