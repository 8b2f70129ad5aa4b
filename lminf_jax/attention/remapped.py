"""Methods that place each (query, key) pair at positions of its own: Self-Extend and Dual Chunk
Attention (`RemappedMethod`).

Such a method's rule is a tuple of `Placement`s, values like banded.py's rotations: each says
which causal pairs it places (`selects`), and where it puts their query and key (`query_offsets`,
`key_offsets`, small offsets from the chunk's last position). The placements partition the causal
pairs; the logit of a pair is `(R_qoff q_i).(R_koff k_j)/sqrt(H)` under its placement, and one
softmax runs over all of a query's keys.

Flash-style, as dense attention: a scan over query chunks, an online softmax over key blocks,
blocks in a chunk's future skipped; a placement's scores are computed only for the blocks where
it places some pair. O(T^2) time, O(T*C) memory. The cache keeps every key raw, at its position
(as dense's, a ring of max_len tokens that refuses more), so cached chunks and decode steps place
their pairs as the one-shot forward does.
"""

from __future__ import annotations

import abc
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.method import CachedLayer, CacheLayout, Tiling
from lminf_jax.errors import UserError
from lminf_jax.positional import Positional


class Placement(Protocol):
  """Where one kind of (query, key) pair sits. Positions are RoPE positions, idx sequence indices."""

  def selects(self, pos_bc: jnp.ndarray, idx_bc: jnp.ndarray, pos_bs: jnp.ndarray,
              idx_bs: jnp.ndarray) -> jnp.ndarray:
    """[B, C, S]: the causal pairs this placement places."""

  def query_offsets(self, pos_bc: jnp.ndarray, ref_b1: jnp.ndarray) -> jnp.ndarray:
    """[B, C] the query rotation, relative to `ref` (the chunk's last position)."""

  def key_offsets(self, pos_bs: jnp.ndarray, ref_b1: jnp.ndarray) -> jnp.ndarray:
    """[B, S] the key rotation, relative to `ref`."""


def remapped_attention(q_btnh: jnp.ndarray, pos_bt: jnp.ndarray, idx_bt: jnp.ndarray, keys: Keys,
                       placements: tuple[Placement, ...], pe: Positional, chunk: int, key_block: int,
                       scale=None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Queries q [B,T,N,H] (positions, idx [B,T]) over raw `keys` [B,K,L,H] (at their positions; they
  may begin with a cache's keys), each causal pair placed by the placement that selects it.
  `scale(pos) -> factor` (optional) multiplies queries and keys before rotation. Returns
  (out [B,T,N,H], lse [B,T,N])."""
  kv = keys.k_bklh.shape[1]
  s = min(key_block, keys.idx_bl.shape[1])
  keys = keys.pad(0, -keys.idx_bl.shape[1] % s)
  if scale is not None:
    q_btnh = q_btnh * scale(pos_bt)[:, :, None, None].astype(q_btnh.dtype)
    keys = keys._replace(k_bklh=keys.k_bklh * scale(keys.pos_bl)[:, None, :, None].astype(keys.k_bklh.dtype))

  def chunk_step(ci, q_bcnh, pos_bc, idx_bc):
    ref_b1 = pos_bc[:, -1:]
    q_tiles = [bw.query_tile(q_bcnh, p.query_offsets(pos_bc, ref_b1), pe, kv) for p in placements]

    def key_step(state, kb):
      start = kb * s
      k_bksh, v_bksh = (jax.lax.dynamic_slice_in_dim(x, start, s, axis=2) for x in (keys.k_bklh, keys.v_bklh))
      pos_bs, idx_bs = (jax.lax.dynamic_slice_in_dim(x, start, s, axis=1) for x in (keys.pos_bl, keys.idx_bl))
      seen_bcs = bw.visible(idx_bc, idx_bs)

      def fold(state):
        s_bkms = jnp.full(q_tiles[0].x.shape[:3] + (s,), -jnp.inf, jnp.float32)
        for p, q_tile in zip(placements, q_tiles):
          use_bcs = p.selects(pos_bc, idx_bc, pos_bs, idx_bs) & seen_bcs
          # (the keys are rotated inside the branch: only for the blocks where the placement places a pair)
          p_bkms = jax.lax.cond(
              jnp.any(use_bcs),
              lambda p=p, q_tile=q_tile: bw.scores(q_tile, bw.key_tile(k_bksh, p.key_offsets(pos_bs, ref_b1), pe), pe),
              lambda: jnp.zeros_like(s_bkms))
          s_bkms = jnp.where(_rows(use_bcs, s_bkms.shape), p_bkms, s_bkms)
        return bw.update(state, s_bkms, v_bksh, seen_bcs)

      return jax.lax.cond(jnp.any(seen_bcs), fold, lambda st: st, state), None

    state, _ = jax.lax.scan(key_step, bw.init_state(q_tiles[0].x), jnp.arange(keys.idx_bl.shape[1] // s))
    return bw.finish(state, q_bcnh.shape[1], q_btnh.dtype)

  return bw.over_query_chunks(chunk_step, q_btnh, pos_bt, idx_bt, chunk)


def _rows(mask_bcs: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """A [B, C, S] mask as the [B, K, M, S] rows of score tiles (row m = g*C + c)."""
  b, k, m, s = shape
  c = mask_bcs.shape[1]
  return jnp.broadcast_to(mask_bcs[:, None, None], (b, k, m // c, c, s)).reshape(shape)


class RemappedMethod(Tiling):
  """A method whose rule is `placements()`: one-shot, cached and decode attention all follow from
  it. Its cache, as dense's, keeps every key (a ring of max_len tokens that refuses more)."""

  @abc.abstractmethod
  def placements(self) -> tuple[Placement, ...]:
    """The method's placements (from its resolved spec), which partition the causal pairs."""

  def scale(self) -> Callable[[jnp.ndarray], jnp.ndarray] | None:
    """`f(positions [B, L]) -> factor [B, L]` that queries and keys are multiplied by (None: none)."""
    return None

  def one_shot(self, q_btnh, k_btkh, v_btkh, positions_bt, pe,
               placements: tuple[Placement, ...] | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) of q [B,T,N,H] over its own k/v [B,T,K,H] (before RoPE), the
    pairs placed by `placements` (default: the method's; pairs no placement selects are left out)."""
    positions_bt = positions_bt.astype(jnp.int32)
    idx_bt = bw.sequence_index(positions_bt)
    keys = Keys(jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt, idx_bt)
    return remapped_attention(q_btnh, positions_bt, idx_bt, keys, placements or self.placements(), pe, self.chunk,
                              self.key_block, self.scale())

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    return self.one_shot(q_btnh, k_btkh, v_btkh, positions_bt, pe)[0]

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    if not max_len:
      raise UserError(f"a {self.name.lower()} cache keeps every key, so it needs max_len")
    return CacheLayout(0, max_len)

  def attend_chunk(self, q_bcnh, new: Keys, cached: CachedLayer, pe, layer):
    return remapped_attention(q_bcnh, new.pos_bl, new.idx_bl, cached.ordered_ring().concat(new), self.placements(), pe,
                              self.chunk, self.key_block, self.scale())[0], None
