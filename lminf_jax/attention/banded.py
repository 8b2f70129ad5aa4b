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
                  inv_freq_h: jnp.ndarray, chunk: int, n_start: int, window: int, start_rotation: StartRotation):
  """q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N])."""
  p = bw.pad_inputs(q_btnh, k_btkh, v_btkh, positions_bt, chunk)
  c, h, kv = p.chunk, q_btnh.shape[-1], k_btkh.shape[2]
  scale = h**-0.5
  n_start = min(n_start, p.length)
  band_blocks = -(-(window - 1) // c)  # key blocks before the query chunk's own block

  # Starting keys: each row's first n_start real tokens (rows are left-padded).
  first_b = -p.idx_bt[:, 0]
  start_idx_bg = jnp.broadcast_to(jnp.arange(n_start, dtype=jnp.int32), (p.idx_bt.shape[0], n_start))
  gather_bg = jnp.minimum(first_b[:, None] + start_idx_bg, p.length - 1)
  k_start, v_start = (jnp.take_along_axis(x, gather_bg[:, :, None, None], axis=1) for x in (p.k_btkh, p.v_btkh))
  pos_start_bg = jnp.take_along_axis(p.positions_bt, gather_bg, axis=1)
  start_exists_bg = first_b[:, None] + start_idx_bg < p.length

  # Band: keys left-padded by band_blocks*C invalid slots, so chunk ci's band starts at ci*C.
  def left_pad(x, value):
    widths = [(0, 0)] * x.ndim
    widths[1] = (band_blocks * c, 0)
    return jnp.pad(x, widths, constant_values=value)

  k_band, v_band, pos_band, idx_band = (left_pad(x, v) for x, v in
                                        ((p.k_btkh, 0), (p.v_btkh, 0), (p.positions_bt, 0), (p.idx_bt, -1)))

  def chunk_step(_, xs):
    ci, q_bcnh, pos_bc, idx_bc = xs
    b, _, n, _ = q_bcnh.shape
    ref_b1 = pos_bc[:, -1:]
    state = bw.init_state(b, kv, n // kv, c, h)
    if n_start:
      q_offsets, k_offsets = start_rotation
      q_far = bw.group_heads(apply_rope(q_bcnh, q_offsets(pos_bc, idx_bc, ref_b1), inv_freq_h) * scale, kv)
      k_far = apply_rope(k_start, k_offsets(pos_start_bg, start_idx_bg, ref_b1), inv_freq_h)
      mask_bcg = (idx_bc[:, :, None] - start_idx_bg[:, None, :] >= window) & start_exists_bg[:, None, :]
      state = bw.update(state, bw.scores(q_far, k_far), v_start, mask_bcg)
    q_near = bw.group_heads(apply_rope(q_bcnh, pos_bc - ref_b1, inv_freq_h) * scale, kv)

    def fold(state, kb):
      start = (ci + kb) * c
      k_bskh, v_bskh, pos_bs, idx_bs = (bw.block(x, start, c) for x in (k_band, v_band, pos_band, idx_band))
      dist_bcs = idx_bc[:, :, None] - idx_bs[:, None, :]
      mask_bcs = (dist_bcs >= 0) & (dist_bcs < window) & (idx_bs >= 0)[:, None, :]
      s_bkgcs = bw.scores(q_near, apply_rope(k_bskh, pos_bs - ref_b1, inv_freq_h))
      return bw.update(state, s_bkgcs, v_bskh, mask_bcs)

    def key_step(state, kb):  # blocks wholly before the sequence start are skipped
      return jax.lax.cond(ci + kb >= band_blocks, fold, lambda s, _: s, state, kb), None

    state, _ = jax.lax.scan(key_step, state, jnp.arange(band_blocks + 1))
    return None, bw.finish(state, q_btnh.dtype)

  xs = (jnp.arange(p.num_chunks),) + tuple(bw.split_chunks(x, c) for x in (p.q_btnh, p.positions_bt, p.idx_bt))
  _, (o_nbcnh, lse_nbcn) = jax.lax.scan(jax.checkpoint(chunk_step), None, xs)
  return bw.unsplit_chunks(o_nbcnh, p.length), bw.unsplit_chunks(lse_nbcn, p.length)
