"""Causal attention over every earlier key block: ordinary dense attention, and LM-Infinite's
"distance limit without the mask" ablation (all far keys attended at distance `limit`).

Flash-style: scan over query chunks, online softmax over key blocks; blocks in a chunk's
future are skipped with `lax.cond`. O(T^2) time, O(T*C) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.rope import apply_rope


def causal_attention(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                     inv_freq_h: jnp.ndarray, chunk: int, far: tuple[int, int] | None = None):
  """Causal attention; q [B,T,N,H], k/v [B,T,K,H] before RoPE -> (out [B,T,N,H], lse [B,T,N]).

  Keys at true relative distance, except with `far=(window, limit)`: keys with i-j >= window
  are seen at distance `limit` (query rotated at `limit`, key unrotated).
  """
  p = bw.pad_inputs(q_btnh, k_btkh, v_btkh, positions_bt, chunk)
  c, h, kv = p.chunk, q_btnh.shape[-1], k_btkh.shape[2]
  scale = h**-0.5

  def chunk_step(_, xs):
    ci, q_bcnh, pos_bc, idx_bc = xs
    ref_b1 = pos_bc[:, -1:]
    q_near = bw.group_heads(apply_rope(q_bcnh, pos_bc - ref_b1, inv_freq_h) * scale, kv)
    if far is not None:
      q_far = bw.group_heads(apply_rope(q_bcnh, jnp.full_like(pos_bc, far[1]), inv_freq_h) * scale, kv)

    def fold(state, kb):
      k_bskh, pos_bs, idx_bs = (bw.block(x, kb * c, c) for x in (p.k_btkh, p.positions_bt, p.idx_bt))
      s_bkgcs = bw.scores(q_near, apply_rope(k_bskh, pos_bs - ref_b1, inv_freq_h))
      dist_bcs = idx_bc[:, :, None] - idx_bs[:, None, :]
      if far is not None:
        s_bkgcs = jnp.where((dist_bcs < far[0])[:, None, None], s_bkgcs, bw.scores(q_far, k_bskh))
      mask_bcs = (dist_bcs >= 0) & (idx_bs >= 0)[:, None, :]
      return bw.update(state, s_bkgcs, bw.block(p.v_btkh, kb * c, c), mask_bcs)

    def key_step(state, kb):
      return jax.lax.cond(kb <= ci, fold, lambda s, _: s, state, kb), None

    state, _ = jax.lax.scan(key_step, bw.init_state(q_bcnh.shape[0], kv, q_bcnh.shape[2] // kv, c, h),
                            jnp.arange(p.num_chunks))
    return None, bw.finish(state, q_btnh.dtype)

  xs = (jnp.arange(p.num_chunks),) + tuple(bw.split_chunks(x, c) for x in (p.q_btnh, p.positions_bt, p.idx_bt))
  _, (o_nbcnh, lse_nbcn) = jax.lax.scan(jax.checkpoint(chunk_step), None, xs)
  return bw.unsplit_chunks(o_nbcnh, p.length), bw.unsplit_chunks(lse_nbcn, p.length)
