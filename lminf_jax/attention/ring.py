"""A cache ring read in place by one decode token, with small RoPE angles however long the stream.

The ring (W slots) holds each key rotated by its position modulo W and, in place of the position,
the anchor it is rotated from (position - position % W): rotating it further by (anchor - ref)
gives the key at (position - ref), so every angle is below ~2W whether the stream is 10^2 or
10^8 tokens long (DESIGN.md section 5). A single query attends the ring where it lies, with no
rotation of cached keys: a window holds at most two anchors, so the query is rotated twice and
each key takes the score of its anchor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.blockwise import Keys
from lminf_jax.rope import apply_rope


def anchored(k_lbckh: jnp.ndarray, positions_bc: jnp.ndarray, ring_len: int,
             inv_freq_h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Ring entries of raw keys [L, B, C, K, H]: (keys rotated by position % W, anchors [B, C])."""
  offsets_bc = positions_bc % ring_len
  return apply_rope(k_lbckh, offsets_bc[None, :, :, None], inv_freq_h), positions_bc - offsets_bc


def ring_scores(q_b1nh: jnp.ndarray, pos_b1: jnp.ndarray, ring: Keys, inv_freq_h: jnp.ndarray) -> jnp.ndarray:
  """Logits [B, K, G, W] of one query at pos against `anchored` ring keys (pos_bl: anchors),
  without rotating them: in-window keys have the query's anchor or the one before (consecutive
  positions), so the query is rotated twice and each key takes its anchor's score. Any other
  anchor (positions with gaps) takes the general path that rotates every key."""
  kv_heads, ring_len = ring.k_bklh.shape[1], ring.k_bklh.shape[2]
  b = q_b1nh.shape[0]
  anchor_b1 = pos_b1 - pos_b1 % ring_len
  own_anchor_bw = ring.pos_bl == anchor_b1
  known = jnp.all(own_anchor_bw | (ring.pos_bl == anchor_b1 - ring_len) | (ring.idx_bl < 0))

  def two_anchors(_):
    offsets_b2 = jnp.concatenate([pos_b1 - anchor_b1, pos_b1 - anchor_b1 + ring_len], axis=1)
    q_bkmh = bw.query_tile(jnp.concatenate([q_b1nh, q_b1nh], axis=1), offsets_b2, inv_freq_h, kv_heads)
    s_bkg2w = bw.scores(q_bkmh, ring.k_bklh).reshape(b, kv_heads, -1, 2, ring_len)
    return jnp.where(own_anchor_bw[:, None, None], s_bkg2w[:, :, :, 0], s_bkg2w[:, :, :, 1])

  def any_anchors(_):
    k_bkwh = apply_rope(ring.k_bklh, (ring.pos_bl - pos_b1)[:, None], inv_freq_h)
    return bw.scores(bw.query_tile(q_b1nh, jnp.zeros_like(pos_b1), inv_freq_h, kv_heads), k_bkwh)

  return jax.lax.cond(known, two_anchors, any_anchors, None)


def own_key_scores(q_b1nh: jnp.ndarray, new: Keys, inv_freq_h: jnp.ndarray) -> jnp.ndarray:
  """Logits [B, K, G, 1] of each row's query against its own key (distance 0)."""
  q_bkgh = bw.query_tile(q_b1nh, jnp.zeros_like(new.pos_bl), inv_freq_h, new.k_bklh.shape[1])
  return bw.scores(q_bkgh, new.k_bklh)
