"""Causal attention over every earlier key block: ordinary dense attention, and LM-Infinite's
"distance limit without the mask" ablation (all far keys attended at distance `limit`).

Flash-style: scan over query chunks, online softmax over key blocks; blocks in a chunk's
future are skipped with `lax.cond`. O(T^2) time, O(T*C) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw


def causal_attention(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                     inv_freq_h: jnp.ndarray, chunk: int, key_block: int, far: tuple[int, int] | None = None):
  """Causal attention; q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N]).

  Keys at true relative distance, except with `far=(window, limit)`: keys with i-j >= window
  are seen at distance `limit` (query rotated at `limit`, key unrotated).
  """
  p = bw.pad_inputs(q_btnh, k_btkh, v_btkh, positions_bt, chunk)
  c, kv = p.chunk, k_btkh.shape[2]
  s = min(key_block, p.positions_bt.shape[1])
  pad = -p.positions_bt.shape[1] % s
  k_bkth, v_bkth = (bw.pad_axis(x, 2, 0, pad) for x in (p.k_bkth, p.v_bkth))
  positions_bt = bw.pad_axis(p.positions_bt, 1, 0, pad)
  idx_bt = bw.pad_axis(p.idx_bt, 1, 0, pad, bw.FUTURE)

  def chunk_step(_, xs):
    ci, q_bcnh, pos_bc, idx_bc = xs
    b = q_bcnh.shape[0]
    ref_b1 = pos_bc[:, -1:]
    q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, inv_freq_h, kv)
    if far is not None:
      q_far = bw.query_tile(q_bcnh, jnp.full_like(pos_bc, far[1]), inv_freq_h, kv)

    def fold(state, kb):
      k_rot, k_raw, v_bksh, idx_bs = bw.key_block(k_bkth, v_bkth, positions_bt, idx_bt, kb * s, s, ref_b1, inv_freq_h)
      s_bkms = bw.scores(q_near, k_rot)
      dist_bcs = idx_bc[:, :, None] - idx_bs[:, None, :]
      if far is not None:
        near_b1cs = jnp.tile((dist_bcs < far[0])[:, None], (1, 1, q_near.shape[2] // c, 1))
        s_bkms = jnp.where(near_b1cs, s_bkms, bw.scores(q_far, k_raw))
      mask_bcs = (dist_bcs >= 0) & (idx_bs >= 0)[:, None, :]
      return bw.update(state, s_bkms, v_bksh, mask_bcs)

    def key_step(state, kb):
      return jax.lax.cond(kb * s < (ci + 1) * c, fold, lambda st, _: st, state, kb), None

    init = bw.init_state(b, kv, q_near.shape[2], q_near.shape[3])
    state, _ = jax.lax.scan(key_step, init, jnp.arange(positions_bt.shape[1] // s))
    return None, bw.finish(state, c, q_btnh.dtype)

  _, (o_nbcnh, lse_nbcn) = jax.lax.scan(jax.checkpoint(chunk_step), None, p.query_chunks())
  return bw.unsplit_chunks(o_nbcnh, p.length), bw.unsplit_chunks(lse_nbcn, p.length)
