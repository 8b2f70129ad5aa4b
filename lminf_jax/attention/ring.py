"""A cache ring read in place by one decode token, with small RoPE angles however long the stream.

The ring (W slots) holds each key rotated by its position modulo W and, in place of the position,
the anchor it is rotated from (position - position % W): rotating it further by (anchor - ref)
gives the key at (position - ref), so every angle is below ~2W whether the stream is 10^2 or
10^8 tokens long (docs/semantics.md#caches-and-long-inputs). A single query attends the ring where it lies, with no
rotation of cached keys: a window holds at most two anchors, so the query is rotated twice and
each key takes the score of its anchor. Under ALiBi (no rotation) the ring stores raw keys at
their positions, and a query's offsets to them give the bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.blockwise import Keys
from lminf_jax.positional import Positional


def anchors(positions: jnp.ndarray, ring_len: int, pe: Positional) -> jnp.ndarray:
  """The position each key is rotated from in the ring: position - position % W (ALiBi: itself)."""
  return positions - positions % ring_len if pe.rotates else positions


def anchored(k_lbckh: jnp.ndarray, positions_bc: jnp.ndarray, ring_len: int,
             pe: Positional) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Ring entries of raw keys [L, B, C, K, H]: (keys rotated by position - anchor, anchors [B, C])."""
  anchors_bc = anchors(positions_bc, ring_len, pe)
  return pe.rotate(k_lbckh, (positions_bc - anchors_bc)[None, :, :, None]), anchors_bc


def ring_scores(q_b1nh: jnp.ndarray, pos_b1: jnp.ndarray, ring: Keys, pe: Positional) -> jnp.ndarray:
  """Logits [B, K, G, W] of one query at pos against `anchored` ring keys (pos_bl: anchors),
  without rotating them: in-window keys have the query's anchor or the one before (consecutive
  positions), so the query is rotated twice and each key takes its anchor's score. Any other
  anchor (positions with gaps), and ALiBi, take the general path that rotates every key."""
  kv_heads, ring_len = ring.k_bklh.shape[1], ring.k_bklh.shape[2]
  b = q_b1nh.shape[0]
  anchor_b1 = pos_b1 - pos_b1 % ring_len
  own_anchor_bw = ring.pos_bl == anchor_b1
  known = jnp.all(own_anchor_bw | (ring.pos_bl == anchor_b1 - ring_len) | (ring.idx_bl < 0))

  def two_anchors(_):
    offsets_b2 = jnp.concatenate([pos_b1 - anchor_b1, pos_b1 - anchor_b1 + ring_len], axis=1)
    q_bkmh = bw.query_tile(jnp.concatenate([q_b1nh, q_b1nh], axis=1), offsets_b2, pe, kv_heads)
    s_bkg2w = bw.scores(q_bkmh, bw.Tile(ring.k_bklh, jnp.zeros_like(ring.pos_bl)), pe)
    s_bkg2w = s_bkg2w.reshape(b, kv_heads, -1, 2, ring_len)
    return jnp.where(own_anchor_bw[:, None, None], s_bkg2w[:, :, :, 0], s_bkg2w[:, :, :, 1])

  def any_anchors(_):
    k_rot = bw.key_tile(ring.k_bklh, ring.pos_bl - pos_b1, pe)
    return bw.scores(bw.query_tile(q_b1nh, jnp.zeros_like(pos_b1), pe, kv_heads), k_rot, pe)

  if not pe.rotates:
    return any_anchors(None)
  return jax.lax.cond(known, two_anchors, any_anchors, None)


def own_key_scores(q_b1nh: jnp.ndarray, new: Keys, pe: Positional) -> jnp.ndarray:
  """Logits [B, K, G, 1] of each row's query against its own key (distance 0)."""
  q_bkgh = bw.query_tile(q_b1nh, jnp.zeros_like(new.pos_bl), pe, new.k_bklh.shape[1])
  return bw.scores(q_bkgh, bw.Tile(new.k_bklh, jnp.zeros_like(new.pos_bl)), pe)
