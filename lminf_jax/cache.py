"""Fixed-size KV caches: starting-token slots plus a ring buffer, as pytrees of static shape.

`lambda` keeps n_global slots and an n_local ring, `streaming` n_sink slots and an n_recent
ring; `dense` is a ring of a chosen maximum length with no slots (feeding more tokens than it
holds is an error). Given a maximum length below the window, a lambda or streaming ring is that
long (a decode step reads only those slots) and, like dense, refuses more. Cache memory never grows.
Refusing is `check_room`'s one-line error, or, under a caller's jit, where it cannot look at the
cache, NaN outputs from then on for each row that overflowed (`capacity`, `attend_cached`).

RoPE angles stay small however long the stream (DESIGN.md section 5). Slots hold keys before
RoPE with their positions. The ring (W slots) holds each key rotated by its position modulo W
and, in place of the position, the anchor it is rotated from (position - position % W): rotating
it further by (anchor - ref) gives the key at (position - ref), so every angle is below ~2W
whether the stream is 10^2 or 10^8 tokens long.

Layers only read the cache; `write` stores a chunk's keys for all layers at once, in place.
A chunk is attended with `band_attention` (the ring, oldest first, as key context; the slots as
starting keys): the same computation as the one-shot forward. A single decode token attends the
ring where it lies, with no rotation of cached keys: a window holds at most two anchors, so
the query is rotated twice and each key takes the score of its anchor.

`infllm` adds to lambda's layout (n_init slots, a ring of W = n_local + block_size raw keys, so
evicted tokens stay until their block forms) each ring key's local attention probability sum
and a pool of formed blocks with their representative keys: `infllm_chunk` over the ring
(oldest first) and the chunk, the slots and the pool; `write` forms the blocks a chunk completes.
The pool holds every block of `max_len` tokens (or capacity_blocks). The ring also keeps a copy
of its keys rotated as lambda's are, so that a single decode token reads it in place, in one pass.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.banded import Keys, add_starting_keys, band_attention
from lminf_jax.attention.infllm import Pool, add_far_keys, blocks_formed, context_window, infllm_chunk, \
    pool_blocks, representative_keys
from lminf_jax.attention.methods import band_rotation, band_shape
from lminf_jax.attention.specs import Dense, InfLLM, Lambda
from lminf_jax.errors import UserError
from lminf_jax.rope import apply_rope


class LayerKV(NamedTuple):
  """One layer's keys and values; the cache stacks L of them (leading axis) for the layer scan."""

  slot_k: jnp.ndarray  # [B, K, G, H] starting tokens, before RoPE
  slot_v: jnp.ndarray
  ring_k: jnp.ndarray  # [B, K, W, H] the latest W tokens at slot idx % W, rotated by position % W
  ring_v: jnp.ndarray
  ring_colsum: jnp.ndarray  # [B, N, W] infllm: local attention probability each ring key received
  pool_k: jnp.ndarray  # [B, K, P*bs, H] infllm: raw keys of the formed blocks
  pool_v: jnp.ndarray
  pool_rk: jnp.ndarray  # [B, N, P, H] infllm: their representative keys
  ring_rk: jnp.ndarray  # [B, K, W, H] infllm: the ring keys also rotated by position % W (for decoding)


class Cache(NamedTuple):
  kv: LayerKV  # every leaf with a leading L axis
  slot_pos: jnp.ndarray  # [B, G] positions of the starting tokens (shared by all layers)
  slot_idx: jnp.ndarray  # [B, G] their sequence indices, -1 while empty
  ring_anchor: jnp.ndarray  # [B, W] position - position % W of the ring's keys
  ring_idx: jnp.ndarray  # [B, W] their sequence indices, -1 while empty
  next_idx: jnp.ndarray  # [B] sequence index of the next real token
  formed: jnp.ndarray  # [B] infllm: blocks formed

  def slots(self, kv: LayerKV) -> Keys:
    return Keys(kv.slot_k, kv.slot_v, self.slot_pos, self.slot_idx)

  def ring(self, kv: LayerKV) -> Keys:
    return Keys(kv.ring_k, kv.ring_v, self.ring_anchor, self.ring_idx)


def cache_shape(spec, max_len: int | None = None) -> tuple[int, int]:
  """(starting slots, ring length) for a resolved spec; dense needs `max_len`. A banded ring is
  never longer than `max_len`: a ring that holds every token is the window of a short stream."""
  if isinstance(spec, Dense):
    if not max_len:
      raise UserError("a dense cache needs max_len")
    return 0, max_len
  if isinstance(spec, InfLLM):
    return spec.n_init, context_window(spec)
  if isinstance(spec, Lambda) and (spec.top_k or not spec.mask):
    raise UserError("cached lambda supports neither top_k nor the no-mask ablation (both need every key)")
  n_start, window = band_shape(spec)
  return n_start, min(window, max_len or window)


def init_cache(config, spec, batch: int, max_len: int | None = None) -> Cache:
  """An empty cache for `batch` rows under the attention `spec`, for up to `max_len` tokens
  (required by dense and infllm; a lambda or streaming cache without it takes any number)."""
  spec = config.resolve_attention(spec)
  n_slots, ring = cache_shape(spec, max_len)
  n_pool, bs, n_colsum = 0, 0, 0
  if isinstance(spec, InfLLM):
    if not max_len:
      raise UserError("an infllm cache needs max_len (its block pool holds every block of max_len tokens)")
    n_pool, bs, n_colsum = pool_blocks(max_len, spec), spec.block_size, ring
  dtype = jnp.dtype(config.dtype)
  layers, heads, kv_heads, h = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
  kv = lambda length: jnp.zeros((layers, batch, kv_heads, length, h), dtype)  # noqa: E731
  index = lambda length, fill: jnp.full((batch, length), fill, jnp.int32)  # noqa: E731
  return Cache(LayerKV(kv(n_slots), kv(n_slots), kv(ring), kv(ring), jnp.zeros((layers, batch, heads, n_colsum)),
                       kv(n_pool * bs), kv(n_pool * bs), jnp.zeros((layers, batch, heads, n_pool, h)),
                       kv(ring if isinstance(spec, InfLLM) else 0)),
               index(n_slots, 0), index(n_slots, -1), index(ring, 0), index(ring, -1), jnp.zeros((batch,), jnp.int32),
               jnp.zeros((batch,), jnp.int32))


def capacity(spec, cache: Cache, kv: LayerKV) -> int | None:
  """Real tokens a row of the cache holds before it would wrap (a dense cache, a ring shorter
  than its window: the ring length) or drop blocks (infllm: up to the first token whose block
  the pool has no room for); None for a ring as long as its window, which takes any number."""
  ring_len = cache.ring_idx.shape[1]
  if isinstance(spec, InfLLM):  # the inverse of pool_blocks
    return spec.n_init + spec.n_local + (kv.pool_rk.shape[-2] + 1) * spec.block_size
  return ring_len if isinstance(spec, Dense) or ring_len < band_shape(spec)[1] else None


def check_room(cache: Cache, spec, new_tokens_b) -> None:
  """Raises UserError if feeding `new_tokens_b` more real tokens per row overflows the cache's
  `capacity`. Traced (under a caller's jit) it cannot look: then the cached forward refuses
  itself, with NaN outputs for the rows that overflow (`attend_cached`)."""
  room = capacity(spec, cache, cache.kv)
  if room is None or any(isinstance(x, jax.core.Tracer) for x in (cache.next_idx, new_tokens_b)):
    return
  need = int(np.max(np.asarray(cache.next_idx) + np.asarray(new_tokens_b)))
  if need <= room:
    return
  if isinstance(spec, InfLLM):  # names the capacity and the blocks needed (the last block is never attended)
    pool_blocks(need, dataclasses.replace(spec, capacity_blocks=cache.kv.pool_rk.shape[-2]))
  raise UserError(f"{type(spec).__name__.lower()} cache full: it holds {room} tokens, but this call needs "
                  f"{need} (init_cache's max_len)")


def chunk_indices(next_idx_b: jnp.ndarray, positions_bc: jnp.ndarray) -> jnp.ndarray:
  """Sequence indices [B, C] of a chunk (negative positions = padding, idx -1)."""
  valid_bc = positions_bc >= 0
  idx_bc = next_idx_b[:, None] + jnp.cumsum(valid_bc, axis=1, dtype=jnp.int32) - 1
  return jnp.where(valid_bc, idx_bc, -1)


def attend_cached(q_bcnh, k_bckh, v_bckh, positions_bc, idx_bc, kv: LayerKV, cache: Cache, inv_freq_h, spec):
  """Attention [B, C, N, H] of a chunk over one layer's cache (not yet holding the chunk) and
  itself, and (infllm) the local probability sums [B, N, W+C] of the ring and chunk keys, else None.
  A row whose chunk overflows the cache's `capacity` (which `check_room` refuses before, unless
  traced) gets NaN, and so does every later chunk of it: `write` drops what does not fit."""
  new = Keys(jnp.swapaxes(k_bckh, 1, 2), jnp.swapaxes(v_bckh, 1, 2), positions_bc, idx_bc)
  # The chunk's first tokens of a sequence are starting keys of its later queries.
  starts = _write_slots(cache.slots(kv), new)
  colsum = None
  if isinstance(spec, InfLLM):
    pool = Pool(kv.pool_k, kv.pool_v, kv.pool_rk, cache.formed)
    if q_bcnh.shape[1] == 1:
      out_bcnh, colsum = _infllm_one(q_bcnh, new, cache, kv, pool, inv_freq_h, spec)
    else:
      out_bcnh, colsum = infllm_chunk(q_bcnh, positions_bc, idx_bc, _ordered(cache, cache.ring(kv), new), starts, pool,
                                      inv_freq_h, spec)
  else:
    window = cache.ring_idx.shape[1] if isinstance(spec, Dense) else band_shape(spec)[1]
    if q_bcnh.shape[1] == 1:
      out_bcnh = _attend_one(q_bcnh, new, cache.slots(kv), cache.ring(kv), inv_freq_h, window, spec)
    else:
      out_bcnh = band_attention(q_bcnh, positions_bc, idx_bc, _ordered(cache, cache.ring(kv), new), starts,
                                inv_freq_h, spec.chunk, spec.key_block, window, band_rotation(spec))[0]
  room = capacity(spec, cache, kv)
  if room is not None:
    out_bcnh = jnp.where((jnp.max(idx_bc, axis=1) >= room)[:, None, None, None], jnp.nan, out_bcnh)
  return out_bcnh, colsum


def _ring_order(cache: Cache) -> jnp.ndarray:
  """[B, W]: ring slot (next_idx + w) % W holds the w-th oldest token."""
  ring_len = cache.ring_idx.shape[1]
  return (cache.next_idx[:, None] + jnp.arange(ring_len, dtype=jnp.int32)) % ring_len


def _ordered(cache: Cache, ring: Keys, new: Keys) -> Keys:
  """One layer's ring oldest first, then the chunk: keys [B, K, W+C, H], indices [B, W+C]."""
  order_bw = _ring_order(cache)
  context = Keys(*(jnp.take_along_axis(x, order_bw[:, None, :, None], axis=2) for x in ring[:2]),
                 *(jnp.take_along_axis(x, order_bw, axis=1) for x in ring[2:]))
  return Keys(*(jnp.concatenate([a, b], axis=2 if a.ndim == 4 else 1) for a, b in zip(context, new)))


def _attend_one(q_b1nh, new: Keys, slots: Keys, ring: Keys, inv_freq_h, window: int, spec):
  """One query per row over the ring in place, its own key and the starting slots: [B, 1, N, H]."""
  b, _, n, h = q_b1nh.shape
  kv_heads = ring.k_bklh.shape[1]
  pos_b1, idx_b1 = new.pos_bl, new.idx_bl
  state = bw.init_state(b, kv_heads, n // kv_heads, h)
  state = add_starting_keys(state, q_b1nh, pos_b1, idx_b1, pos_b1, slots, inv_freq_h, window, band_rotation(spec))
  state = bw.update(state, _ring_scores(q_b1nh, pos_b1, ring, inv_freq_h), ring.v_bklh,
                    _in_window(idx_b1, ring.idx_bl, window)[:, None])
  state = bw.update(state, _own_key_scores(q_b1nh, new, inv_freq_h), new.v_bklh, (idx_b1 >= 0)[:, :, None])
  return bw.finish(state, 1, q_b1nh.dtype)[0]


def _in_window(idx_b1, ring_idx_bw, window: int) -> jnp.ndarray:
  dist_bw = idx_b1 - ring_idx_bw
  return (dist_bw >= 0) & (dist_bw < window) & (ring_idx_bw >= 0)


def _own_key_scores(q_b1nh, new: Keys, inv_freq_h) -> jnp.ndarray:
  """Logits [B, K, G, 1] of each row's query against its own key (distance 0)."""
  q_bkgh = bw.query_tile(q_b1nh, jnp.zeros_like(new.pos_bl), inv_freq_h, new.k_bklh.shape[1])
  return bw.scores(q_bkgh, new.k_bklh)


def _ring_scores(q_b1nh, pos_b1, ring: Keys, inv_freq_h) -> jnp.ndarray:
  """Logits [B, K, G, W] of one query at pos against ring keys stored rotated by (position % W)
  with their anchors, without rotating them: in-window keys have the query's anchor or the one
  before (consecutive positions), so the query is rotated twice and each key takes its anchor's
  score. Any other anchor (positions with gaps) takes the general path that rotates every key."""
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


def _infllm_one(q_b1nh, new: Keys, cache: Cache, kv: LayerKV, pool: Pool, inv_freq_h, spec):
  """`infllm_chunk` for one query per row, with the ring read where it lies (its rotated copy):
  (out [B, 1, N, H], local probability sums [B, N, W+1] of the ring, oldest first, and the query's
  own key). One pass: a single query's softmax needs no blocks."""
  b, _, n, h = q_b1nh.shape
  ring = cache.ring(kv)  # raw keys at their positions
  kv_heads, ring_len = ring.k_bklh.shape[1], ring.k_bklh.shape[2]
  pos_b1, idx_b1 = new.pos_bl, new.idx_bl
  order_bw = _ring_order(cache)
  pending = Keys(*(jnp.take_along_axis(x, order_bw[:, None, :spec.block_size + 1, None], axis=2) for x in ring[:2]),
                 *(jnp.take_along_axis(x, order_bw[:, :spec.block_size + 1], axis=1) for x in ring[2:]))
  state = bw.init_state(b, kv_heads, n // kv_heads, h)
  state = add_far_keys(state, q_b1nh, pos_b1, idx_b1, pending, cache.slots(kv), pool, inv_freq_h, spec)
  rotated = Keys(kv.ring_rk, ring.v_bklh, ring.pos_bl - ring.pos_bl % ring_len, ring.idx_bl)
  s_bkgw = _ring_scores(q_b1nh, pos_b1, rotated, inv_freq_h)
  local_bw = _in_window(idx_b1, ring.idx_bl, spec.n_local) & (idx_b1 >= 0)
  state = bw.update(state, s_bkgw, ring.v_bklh, local_bw[:, None])
  s_own_bkg1 = _own_key_scores(q_b1nh, new, inv_freq_h)
  state = bw.update(state, s_own_bkg1, new.v_bklh, (idx_b1 >= 0)[:, :, None])
  out_b1nh, lse_b1n = bw.finish(state, 1, q_b1nh.dtype)
  lse_bkg1 = lse_b1n.reshape(b, kv_heads, -1, 1)
  lse_bkg1 = jnp.where(jnp.isfinite(lse_bkg1), lse_bkg1, 0)
  p_bkgw = jnp.where(local_bw[:, None, None], jnp.exp(s_bkgw - lse_bkg1), 0)
  p_bkg1 = jnp.where((idx_b1 >= 0)[:, None, None], jnp.exp(s_own_bkg1 - lse_bkg1), 0)
  p_bnw = jnp.take_along_axis(p_bkgw.reshape(b, n, ring_len), order_bw[:, None], axis=2)
  return out_b1nh, jnp.concatenate([p_bnw, p_bkg1.reshape(b, n, 1)], axis=2)


def write(cache: Cache, k_lbckh, v_lbckh, colsum_lbnx, positions_bc, idx_bc, inv_freq_h, spec) -> Cache:
  """Stores a chunk's keys and values of every layer [L, B, C, K, H]: a token goes to slot idx
  (if idx < G) and to ring slot idx % W (only the chunk's last W tokens: no slot is written
  twice). Padding (idx -1) is dropped, and so is a token past the capacity of a ring that must
  not wrap (its row's outputs are NaN: `attend_cached`). infllm also adds the chunk's probability sums
  [L, B, N, W+C] (from `attend_cached`) and forms the blocks the chunk completes."""
  ring_len = cache.ring_idx.shape[1]
  valid_bc = idx_bc >= 0
  new = Keys(k_lbckh, v_lbckh, positions_bc, idx_bc)
  slots = _write_slots(cache.slots(cache.kv), new)
  next_idx = cache.next_idx + jnp.sum(valid_bc, axis=1, dtype=jnp.int32)
  last_b1 = jnp.max(idx_bc, axis=1, keepdims=True)
  keep_bc = valid_bc & (idx_bc > last_b1 - ring_len)
  if capacity(spec, cache, cache.kv) == ring_len:  # a ring that must not wrap (dense, short)
    keep_bc &= idx_bc < ring_len
  ring_at = jnp.where(keep_bc, idx_bc % ring_len, ring_len)
  kv, formed = cache.kv, cache.formed
  if isinstance(spec, InfLLM):  # raw keys (the far branch needs them unrotated) with their positions
    kv, formed = _form_blocks(cache, new, colsum_lbnx, next_idx, spec)
    # The ring writes below take a zero data dependency on the formation, which reads the ring:
    # otherwise XLA may order them first and copies the ring to keep the old one.
    after = 0 * jnp.sum(kv.pool_rk[..., :1, :1])
    new = new._replace(k_bklh=k_lbckh + after, v_bklh=v_lbckh + after)
    k_lbckh, colsum_lbnx = new.k_bklh, colsum_lbnx + after
    b_b1 = jnp.arange(idx_bc.shape[0])[:, None]
    kv = kv._replace(ring_colsum=kv.ring_colsum.at[:, b_b1, :, ring_at].set(
        colsum_lbnx[..., ring_len:].transpose(1, 3, 0, 2), mode="drop"))
    rotated_lbckh = apply_rope(k_lbckh, (positions_bc % ring_len)[None, :, :, None], inv_freq_h)
    kv = kv._replace(ring_rk=_scatter_layers(kv.ring_rk, ring_at, rotated_lbckh))
    anchor_bc = positions_bc
  else:
    anchor_bc = positions_bc - positions_bc % ring_len
    new = new._replace(k_bklh=apply_rope(k_lbckh, (positions_bc - anchor_bc)[None, :, :, None], inv_freq_h))
  ring = _put(cache.ring(kv), ring_at, new._replace(pos_bl=anchor_bc))
  kv = kv._replace(slot_k=slots.k_bklh, slot_v=slots.v_bklh, ring_k=ring.k_bklh, ring_v=ring.v_bklh)
  return Cache(kv, slots.pos_bl, slots.idx_bl, ring.pos_bl, ring.idx_bl, next_idx, formed)


def _form_blocks(cache: Cache, new: Keys, colsum_lbnx, next_idx_b, spec) -> tuple[LayerKV, jnp.ndarray]:
  """infllm: adds the chunk's probability sums to the ring's, and moves every block completed by
  the chunk to the pool with its representative keys. A block token from before the chunk is at
  ring slot idx % W (it is still in the ring: W = n_local + block_size); one of the chunk is at
  its place in the chunk, whose real tokens may follow padding."""
  kv = cache.kv
  ring_len, c = cache.ring_idx.shape[1], new.idx_bl.shape[1]
  n_pool, bs = kv.pool_rk.shape[3], spec.block_size
  slot_to_entry_bw = (jnp.arange(ring_len) - cache.next_idx[:, None]) % ring_len
  ring_colsum = kv.ring_colsum + jnp.take_along_axis(colsum_lbnx[..., :ring_len], slot_to_entry_bw[None, :, None],
                                                     axis=-1)
  # Blocks formed + m for m < C/bs + 2 (at most that many complete in one chunk).
  formed_b = blocks_formed(next_idx_b, spec)
  block_bm = cache.formed[:, None] + jnp.arange(c // bs + 2)
  token_bx = (spec.n_init + block_bm[:, :, None] * bs + jnp.arange(bs)).reshape(block_bm.shape[0], -1)
  in_ring_bx = token_bx < cache.next_idx[:, None]
  first_real_b1 = jnp.argmax(new.idx_bl >= 0, axis=1)[:, None]
  at_chunk_bx = jnp.clip(token_bx - cache.next_idx[:, None] + first_real_b1, 0, c - 1)

  def gather(ring_x, chunk_x):  # [L, B, *, W or C, H] -> the block tokens [L, B, *, X, H]
    at = lambda at_bx: at_bx[None, :, None, :, None]  # noqa: E731
    return jnp.where(at(in_ring_bx), jnp.take_along_axis(ring_x, at(token_bx % ring_len), axis=3),
                     jnp.take_along_axis(chunk_x, at(at_chunk_bx), axis=3))

  def move(pool):  # (pool_k, pool_v, pool_rk) -> the same with the completed blocks stored
    pool_k, pool_v, pool_rk = pool
    k_lbkxh = gather(kv.ring_k, jnp.swapaxes(new.k_bklh, 2, 3))
    v_lbkxh = gather(kv.ring_v, jnp.swapaxes(new.v_bklh, 2, 3))
    block_colsum_lbnx = gather(ring_colsum[..., None], colsum_lbnx[..., ring_len:, None])[..., 0]
    rk_lbnmh = representative_keys(block_colsum_lbnx, k_lbkxh, spec.repr_tokens, bs)
    keep_bm = block_bm < jnp.minimum(formed_b, n_pool)[:, None]
    b_b1 = jnp.arange(block_bm.shape[0])[:, None]
    at_bm = jnp.where(keep_bm, block_bm, n_pool)
    at_bx = jnp.where(jnp.repeat(keep_bm, bs, axis=1), token_bx - spec.n_init, n_pool * bs)
    put = lambda x, at, y: x.at[:, b_b1, :, at].set(jnp.moveaxis(y, (0, 2), (2, 3)), mode="drop")  # noqa: E731
    return put(pool_k, at_bx, k_lbkxh), put(pool_v, at_bx, v_lbkxh), put(pool_rk, at_bm, rk_lbnmh)

  # Most decode steps complete no block: they skip the gathers and the pool writes. (Only the
  # pool passes through the cond: XLA copies whatever a cond returns unchanged.)
  pool_k, pool_v, pool_rk = jax.lax.cond(jnp.any(formed_b > cache.formed), move, lambda pool: pool,
                                         (kv.pool_k, kv.pool_v, kv.pool_rk))
  return kv._replace(ring_colsum=ring_colsum, pool_k=pool_k, pool_v=pool_v, pool_rk=pool_rk), formed_b


def _write_slots(slots: Keys, new: Keys) -> Keys:
  n_slots = slots.idx_bl.shape[1]
  return _put(slots, jnp.where((new.idx_bl >= 0) & (new.idx_bl < n_slots), new.idx_bl, n_slots), new)


def _put(keys: Keys, at_bc: jnp.ndarray, new: Keys) -> Keys:
  """Writes token c of `new` to slot at_bc[:, c] (out of range: dropped). Key/value arrays are
  [B, K, S, H] with new ones [B, K, C, H], or with a leading layer axis [L, B, K, S, H] with new
  ones [L, B, C, K, H]."""
  b_b1 = jnp.arange(at_bc.shape[0])[:, None]
  if keys.k_bklh.ndim == 4:
    put = lambda x, y: x.at[b_b1, :, at_bc].set(jnp.swapaxes(y, 1, 2), mode="drop")  # noqa: E731
  else:
    put = lambda x, y: _scatter_layers(x, at_bc, y)  # noqa: E731
  return Keys(put(keys.k_bklh, new.k_bklh), put(keys.v_bklh, new.v_bklh), keys.pos_bl.at[b_b1, at_bc].set(
      new.pos_bl, mode="drop"), keys.idx_bl.at[b_b1, at_bc].set(new.idx_bl, mode="drop"))


def _scatter_layers(x_lbksh, at_bc, y_lbckh):
  """x[:, b, :, at[b, c]] = y[:, b, c] for every layer (out-of-range slots dropped)."""
  b_b1 = jnp.arange(at_bc.shape[0])[:, None]  # x[:, b, :, at] has shape [B, C, L, K, H]
  return x_lbksh.at[:, b_b1, :, at_bc].set(jnp.moveaxis(y_lbckh, 0, 2), mode="drop")
