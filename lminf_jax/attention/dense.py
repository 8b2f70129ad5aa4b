"""Ordinary causal attention, flash-style: scan over query chunks, online softmax over the
causal key blocks (future blocks are skipped with `lax.cond`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.specs import Dense
from lminf_jax.rope import apply_rope


def dense_attention(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray,
                    positions_bt: jnp.ndarray, inv_freq_h: jnp.ndarray, spec: Dense) -> jnp.ndarray:
  """Causal softmax attention. q [B,T,N,H], k/v [B,T,K,H] before RoPE -> [B,T,N,H].

  Key j is allowed for query i iff j <= i and positions[j] >= 0 (negative = left padding).
  RoPE is applied at offsets relative to each query chunk's last position.
  """
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  chunk = min(spec.chunk, t)
  positions_bt = bw.extend_positions(positions_bt, chunk)
  q_btnh, k_btkh, v_btkh = (bw.pad_to_multiple(x, chunk) for x in (q_btnh, k_btkh, v_btkh))
  num_chunks = positions_bt.shape[1] // chunk
  offsets_c = jnp.arange(chunk)

  def chunk_step(_, xs):
    c, q_bcnh, pos_bc = xs
    ref_b1 = pos_bc[:, -1:]
    q_bckgh = (apply_rope(q_bcnh, pos_bc - ref_b1, inv_freq_h) * h**-0.5).reshape(b, chunk, kv, n // kv, h)
    i_c = c * chunk + offsets_c

    def key_step(state, kb):
      def fold(state):
        pos_bs = bw.block(positions_bt, kb * chunk, chunk)
        k_bskh = apply_rope(bw.block(k_btkh, kb * chunk, chunk), pos_bs - ref_b1, inv_freq_h)
        j_s = kb * chunk + offsets_c
        mask_bcs = (j_s[None, None, :] <= i_c[None, :, None]) & (pos_bs >= 0)[:, None, :]
        return bw.update(state, q_bckgh, k_bskh, bw.block(v_btkh, kb * chunk, chunk), mask_bcs)

      return jax.lax.cond(kb <= c, fold, lambda s: s, state), None

    state, _ = jax.lax.scan(key_step, bw.init_state(b, kv, n // kv, chunk, h), jnp.arange(num_chunks))
    return None, bw.finish(state, q_btnh.dtype)

  xs = (jnp.arange(num_chunks), bw.split_chunks(q_btnh, chunk), bw.split_chunks(positions_bt, chunk))
  _, o_nbckgh = jax.lax.scan(chunk_step, None, xs)
  return jnp.moveaxis(o_nbckgh, 0, 1).reshape(b, -1, n, h)[:, :t]
