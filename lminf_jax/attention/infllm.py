"""InfLLM (Xiao et al., 2024): LM-Infinite's window plus a block memory of evicted tokens,
looked up per query chunk by relevance (docs/semantics.md#infllm).

Query chunk [s, s+C) attends
  - local: keys 0 <= i-j < n_local at true relative distance (as lambda);
  - far, with the query rotated at n_local-1 and keys unrotated: the init tokens j < n_init,
    the top_k blocks selected among those formed before s, and the evicted tokens not yet in a
    formed block ("pending", j >= n_init + formed*block_size), all with i-j >= n_local;
in one softmax, so every key j <= i is in exactly one branch or in an unselected block.
(`released_prefill`: every query of the chunk sees far keys j <= e-1-n_local, e-1 its last real
query, as the released code's prefill; keys within n_local of a query count in both branches.)
A block's representative key (per query head) is the mean raw key of its repr_tokens tokens
that received the most local attention probability while in the window ("column sums").

`infllm_chunk` is the whole method for one chunk, given its context (the W = n_local +
block_size keys before it, then its own), the init keys and the pool of formed blocks; the
one-shot forward (`infllm_attention`, a scan over chunks) and the cached one (`InfLLM.attend_chunk`)
both call it. Shapes are static: the pool has a fixed number of block slots and unformed blocks
are masked out before `lax.top_k`.

The cache keeps n_init slots and a ring of W = n_local + block_size raw keys (so evicted tokens
stay until their block forms), and, of its own (`InfLLMCache`), each ring key's local attention
probability sum, the pool of formed blocks with their representative keys, and a copy of the
ring's keys rotated as lambda's are, so that a single decode token reads the ring in place, in
one pass (`infllm_one`). `write_extra` forms the blocks a chunk completes (`form_blocks`). The
pool holds every block of `max_len` tokens (or capacity_blocks).

With `offload`, the pool's keys and values live in host memory (memory kind `pinned_host`), and
the device holds `device_blocks` of them (lminf_jax.attention.host_blocks): a chunk copies in
only the blocks it selects that the device does not hold, each into the least recently used slot
(`fetch`), and the blocks it forms are copied out to the host (`store_blocks`). The results are
the in-device pool's (docs/memory.md#infllm-in-host-memory).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention import ring
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.kernels import FlashKernel, flash_band, flash_kernel, merge, on_mesh, xla_gradient
from lminf_jax.attention.method import N_LOCAL_HELP, CachedLayer, CacheLayout, Tiling, option
from lminf_jax.errors import UserError
from lminf_jax.attention.host_blocks import Held, fetch, store_blocks
from lminf_jax.sharding import on_host


class Aux(NamedTuple):
  """What a layer's cached attention hands `write_extra`: the local probability column sums
  [B, N, W+C] and the device's blocks after the chunk's copies."""

  colsum_bnx: jnp.ndarray
  held: Held


@dataclasses.dataclass(frozen=True)
class InfLLM(Tiling):
  """InfLLM: n_init starting tokens + an n_local window + a memory of evicted tokens in blocks of
  block_size, of which each query chunk attends the top_k most relevant. `chunk` is part of the
  semantics here: retrieval happens once per query chunk, and a cache is fed `chunk` tokens at a
  time; capacity_blocks caps the block pool (None: as many blocks as the input forms);
  released_prefill copies the released code's far mask during chunked prefill (docs/semantics.md#infllm)."""

  n_init: int = option(128, "starting tokens", minimum=0)
  n_local: int | None = option(None, N_LOCAL_HELP, minimum=1, model_default=True)
  block_size: int = option(128, "tokens per memory block", minimum=1)
  repr_tokens: int = option(4, "tokens behind a block's representative key", minimum=1)
  top_k: int = option(16, "memory blocks retrieved per query chunk", minimum=1, per_method=True)
  chunk: int  # (Tiling's option, here in the order of the fields)
  capacity_blocks: int | None = option(None, "block pool size (default: every block the input forms)",
                                       minimum=0)
  offload: bool = option(False, "keep the memory blocks in host memory, device_blocks of them on the device")
  device_blocks: int = option(32, "memory blocks the device holds when offloading (at least top_k)", minimum=1)
  released_prefill: bool = option(False, "reproduce the released code's chunked prefill (far keys up to the "
                                         "chunk's last query - n_local: some keys count twice; chunk <= n_local)")

  def __post_init__(self):
    super().__post_init__()
    if self.repr_tokens > self.block_size:
      raise UserError(f"InfLLM.repr_tokens ({self.repr_tokens}) must be <= block_size ({self.block_size})")
    if self.offload and self.device_blocks < self.top_k:
      raise UserError(f"InfLLM.device_blocks ({self.device_blocks}) must be >= top_k ({self.top_k}): a chunk's "
                      f"selected blocks are on the device at once")
    if self.n_local is not None:
      _check_released_chunk(self.chunk, self)

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> InfLLM:
    return dataclasses.replace(self, n_local=self.n_local or max_position_embeddings)

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    xla = functools.partial(infllm_attention, spec=self)
    kernel = flash_kernel(self.kernel, q_btnh.dtype, pe)
    if kernel is None:
      return xla(q_btnh, k_btkh, v_btkh, positions_bt, pe)
    fast = functools.partial(infllm_attention, spec=self, kernel=kernel)
    return on_mesh(functools.partial(xla_gradient, fast, xla), q_btnh, k_btkh, v_btkh, positions_bt, pe,
                   with_lse=False)

  def window_tokens(self) -> int:
    return self.n_init + context_window(self)

  def feed_chunk(self, requested: int | None) -> int:
    return self.chunk  # (a cache retrieves once per fed chunk)

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    if not max_len:
      raise UserError("an infllm cache needs max_len (its block pool holds every block of max_len tokens)")
    return CacheLayout(self.n_init, context_window(self))

  def init_extra(self, config, batch: int, layout: CacheLayout, max_len: int | None):
    layers, heads, kv_heads, h = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
    dtype, w, n_pool, bs = jnp.dtype(config.dtype), layout.ring, pool_blocks(max_len, self), self.block_size
    kv = lambda length: jnp.zeros((layers, batch, kv_heads, length, h), dtype)  # noqa: E731
    pool = kv(n_pool * bs), kv(n_pool * bs)
    if self.offload:  # (init_cache runs this under jit: XLA makes the zeros in host memory)
      pool = jax.device_put(pool, jax.memory.Space.Host)
    d = self.device_blocks if self.offload else 0  # (whatever max_len: the device's bytes are fixed)
    never = jnp.full((layers, batch, d), -1, jnp.int32)
    held = Held(kv(d * bs), kv(d * bs), never, never, jnp.zeros((layers, batch), jnp.int32))
    rk = jnp.zeros((layers, batch, heads, n_pool, h), dtype)
    extra = InfLLMCache(jnp.zeros((layers, batch, heads, w)), *pool, rk, kv(w), held)
    return extra, jnp.zeros((batch,), jnp.int32)

  def memory_hint(self) -> str:
    return "" if self.offload else " (offload=true keeps infllm's memory blocks in host memory)"

  def capacity(self, ring_len: int, extra: InfLLMCache) -> int:
    """Up to the first token whose block the pool has no room for (the inverse of pool_blocks)."""
    return self.n_init + self.n_local + (extra.pool_rk.shape[-2] + 1) * self.block_size

  def cache_full(self, need: int, room: int, extra: InfLLMCache) -> str:
    try:  # names the capacity and the blocks needed (the last block is never attended)
      pool_blocks(need, dataclasses.replace(self, capacity_blocks=extra.pool_rk.shape[-2]))
    except UserError as e:
      return str(e)
    return super().cache_full(need, room, extra)

  def attend_chunk(self, q_bcnh, new: Keys, cached: CachedLayer, pe, layer):
    blocks, held = cached_blocks(q_bcnh, new.idx_bl, cached, pe, self)
    out_bcnh, colsum_bnx = infllm_chunk(q_bcnh, new.pos_bl, new.idx_bl, cached.ordered_ring().concat(new),
                                        cached.slots_with(new), blocks, cached.shared, pe, self)
    return out_bcnh, Aux(colsum_bnx, held)

  def attend_token(self, q_b1nh, new: Keys, cached: CachedLayer, pe, layer):
    blocks, held = cached_blocks(q_b1nh, new.idx_bl, cached, pe, self)
    out_b1nh, colsum_bnx = infllm_one(q_b1nh, new, cached, blocks, pe, self)
    return out_b1nh, Aux(colsum_bnx, held)

  def write_extra(self, cached: CachedLayer, new: Keys, aux: Aux, next_idx_b, ring_at_bc, pe):
    colsum_lbnx = aux.colsum_bnx
    extra, formed_b = form_blocks(cached._replace(extra=cached.extra._replace(held=aux.held)), new, colsum_lbnx,
                                  next_idx_b, self)
    # The ring writes take a zero data dependency on the formation, which reads the ring.
    ring_len = cached.ring.idx_bl.shape[1]
    k_lbckh, colsum_lbnx = bw.after(new.k_bklh, extra.pool_rk), bw.after(colsum_lbnx, extra.pool_rk)
    b_b1 = jnp.arange(ring_at_bc.shape[0])[:, None]
    ring_colsum = extra.ring_colsum.at[:, b_b1, :, ring_at_bc].set(colsum_lbnx[..., ring_len:].transpose(1, 3, 0, 2),
                                                                   mode="drop")
    rotated_lbckh, _ = ring.anchored(k_lbckh, new.pos_bl, ring_len, pe)
    return extra._replace(ring_colsum=ring_colsum, ring_rk=bw.scatter_layers(extra.ring_rk, ring_at_bc,
                                                                              rotated_lbckh)), formed_b


class InfLLMCache(NamedTuple):
  """InfLLM's own per-layer cache arrays (each with a leading L axis in the cache)."""

  ring_colsum: jnp.ndarray  # [B, N, W] local attention probability each ring key received
  pool_k: jnp.ndarray  # [B, K, P*bs, H] raw keys of the formed blocks
  pool_v: jnp.ndarray
  pool_rk: jnp.ndarray  # [B, N, P, H] their representative keys (in the cache's dtype)
  ring_rk: jnp.ndarray  # [B, K, W, H] the ring keys also rotated by position % W (for decoding)
  held: Held  # with offload, the blocks on the device (pool_k and pool_v are then in host memory)

  def logical_axes(self) -> InfLLMCache:
    """Each array's leading logical axes (lminf_jax.cache.placed): keys and values [L, B, K, S, H]
    over rows and kv heads, the rest over rows."""
    rows, kv = ("layers", "cache_batch"), ("layers", "cache_batch", "cache_heads")
    return InfLLMCache(rows, kv, kv, rows, kv, Held(kv, kv, rows, rows, rows))


def _check_released_chunk(c: int, spec) -> None:
  """released_prefill takes chunks of at most n_local queries, as the released code asserts
  (exc_block_size <= n_local): a longer one would see far keys in its queries' future."""
  if spec.released_prefill and c > spec.n_local:
    raise UserError(f"InfLLM.released_prefill needs chunks of at most n_local ({spec.n_local}) queries, got {c}")


def context_window(spec) -> int:
  """W: the keys before a chunk that it may attend locally or as pending far keys."""
  return spec.n_local + spec.block_size


def blocks_formed(end, spec) -> jnp.ndarray:
  """Blocks formed once tokens [0, end) are seen."""
  return jnp.maximum((end - spec.n_local - spec.n_init) // spec.block_size, 0)


def pool_blocks(length: int, spec) -> int:
  """Pool size for `length` tokens: capacity_blocks, or every block formed before the last token;
  a capacity below that is an error naming both."""
  needed = max(0, (length - 1 - spec.n_local - spec.n_init) // spec.block_size)
  if spec.capacity_blocks is None:
    return needed
  if needed > spec.capacity_blocks:
    raise UserError(f"InfLLM block pool full: capacity_blocks={spec.capacity_blocks}, but {length} tokens need "
                    f"{needed} blocks of {spec.block_size}")
  return spec.capacity_blocks


def representative_keys(colsum_nx: jnp.ndarray, k_kxh: jnp.ndarray, repr_tokens: int, block_size: int) -> jnp.ndarray:
  """Per query head and block, the mean raw key of the repr_tokens tokens with the largest column
  sums (ties: the earlier token), averaged in float32 and kept in the keys' dtype. colsum [..., N, P*bs],
  keys [..., K, P*bs, H] -> [..., N, P, H]."""
  *lead, n, x = colsum_nx.shape
  kv, h = k_kxh.shape[-3], k_kxh.shape[-1]
  p = x // block_size
  _, top_npr = jax.lax.top_k(colsum_nx.reshape(*lead, n, p, block_size), repr_tokens)
  at_kgx = (jnp.arange(p)[:, None] * block_size + top_npr).reshape(*lead, kv, n // kv, p * repr_tokens)
  raw_kgxh = jnp.take_along_axis(k_kxh[..., None, :, :], at_kgx[..., None], axis=-2)
  return raw_kgxh.reshape(*lead, n, p, repr_tokens, h).astype(jnp.float32).mean(-2).astype(k_kxh.dtype)


def infllm_chunk(q_bcnh, pos_bc, idx_bc, context: Keys, starts: Keys, blocks: Keys | None, formed_b, pe, spec,
                 local_branch: tuple[jnp.ndarray, jnp.ndarray] | None = None):
  """One query chunk: q [B,C,N,H] at positions / sequence indices [B,C] (idx < 0: padding; the
  chunk's first real query has index s = its row's next token). `context` [B,K,W+C,H] holds raw
  keys with entry w at sequence index s-W+w (its last C entries are the chunk's own keys; idx < 0:
  no key), `starts` the init tokens, `blocks` the selected blocks' keys (`block_keys`; None: no
  pool), formed_b [B] the blocks formed before the chunk; `local_branch`, if given, the local
  branch's (out [B,C,N,H], lse [B,C,N]) from a flash kernel. Returns (out [B,C,N,H], local
  probability column sums [B,N,W+C] over the context, from the chunk's real queries)."""
  b, c, n, _ = q_bcnh.shape
  kv = context.k_bklh.shape[1]
  g = n // kv
  n_local, bs = spec.n_local, spec.block_size
  pending = context.slice(0, bs + c)
  state = add_far_keys(bw.init_state(bw.tile_rows(q_bcnh, kv)), q_bcnh, pos_bc, idx_bc, pending, starts, blocks,
                       formed_b, pe, spec)

  # Local: the context from entry bs on, in key blocks of S, rotated relative to the chunk's last query.
  local = context.slice(bs, None)
  span = n_local + c
  s = min(spec.key_block, span)
  local = local.pad(0, -span % s)
  ref_b1 = pos_bc[:, -1:]
  q_near = bw.query_tile(q_bcnh, pos_bc - ref_b1, pe, kv)

  def block(kb):  # (logits, values) of local key block kb
    k_rot, _, v_bksh = bw.key_block(local.k_bklh, local.v_bklh, local.pos_bl, kb * s, s, ref_b1, pe)
    return bw.scores(q_near, k_rot, pe), v_bksh

  def block_idx(kb):
    return jax.lax.dynamic_slice_in_dim(local.idx_bl, kb * s, s, axis=1)

  def fold(state, kb):
    return bw.fold_block(state, lambda: block(kb), idx_bc, block_idx(kb), n_local), None

  n_blocks = local.idx_bl.shape[1] // s
  if local_branch is None:
    state, _ = jax.lax.scan(fold, state, jnp.arange(n_blocks))
    out_bcnh, lse_bcn = bw.finish(state, c, q_bcnh.dtype)
  else:  # (the far branch alone in `state`)
    out_bcnh, lse_bcn = merge(*local_branch, *bw.finish(state, c, jnp.float32), q_bcnh.dtype)

  # Column sums of P(i, j) = exp(logit - lse_i) over the chunk's queries, for the local keys.
  # (Selection is not differentiable; a padding query's lse is -inf.)
  lse_bkgc1 = jax.lax.stop_gradient(lse_bcn.reshape(b, c, kv, g).transpose(0, 2, 3, 1)[..., None])
  lse_bkgc1 = jnp.where(jnp.isfinite(lse_bkgc1), lse_bkgc1, 0)

  def column_sums(_, kb):
    s_bkgcs = jax.lax.stop_gradient(block(kb)[0]).reshape(b, kv, g, c, s)
    p_bkgcs = jnp.where(bw.visible(idx_bc, block_idx(kb), n_local)[:, None, None], jnp.exp(s_bkgcs - lse_bkgc1), 0)
    return None, p_bkgcs.sum(3).reshape(b, n, s)

  _, p_nbns = jax.lax.scan(column_sums, None, jnp.arange(n_blocks))
  colsum_bnx = jnp.moveaxis(p_nbns, 0, 2).reshape(b, n, -1)[:, :, :span]
  return out_bcnh, bw.pad_axis(colsum_bnx, 2, bs, 0)


def add_far_keys(state: bw.SoftmaxState, q_bcnh, pos_bc, idx_bc, pending: Keys, starts: Keys, blocks: Keys | None,
                 formed_b, pe, spec) -> bw.SoftmaxState:
  """Folds the far branch into a chunk's softmax: the query rotated at n_local-1, raw keys of the
  init tokens, of the pending tokens (the context's first bs + C entries, oldest first; those
  from block formed_b [B] on) and of the selected `blocks` (idx -1: none), each seen only at
  distance >= n_local. With released_prefill the distance is from the chunk's last real query
  (every real query sees far keys j <= e-1-n_local)."""
  far_idx_bc = idx_bc
  if spec.released_prefill:
    _check_released_chunk(idx_bc.shape[1], spec)
    far_idx_bc = jnp.where(idx_bc >= 0, jnp.max(idx_bc, axis=1, keepdims=True), idx_bc)
  q_far = bw.query_tile(q_bcnh, jnp.full_like(pos_bc, spec.n_local - 1), pe, pending.k_bklh.shape[1])
  pending_start_b1 = (spec.n_init + formed_b * spec.block_size)[:, None]
  pending = pending._replace(idx_bl=jnp.where(pending.idx_bl >= pending_start_b1, pending.idx_bl, -1))
  far = [starts, pending] + ([] if blocks is None else [blocks])
  far_k, far_v = (jnp.concatenate([x[i] for x in far], axis=2) for i in (0, 1))
  far_idx_bf = jnp.concatenate([x.idx_bl for x in far], axis=1)
  mask_bcf = bw.visible(far_idx_bc, far_idx_bf, min_dist=spec.n_local)
  far_tile = bw.Tile(far_k, jnp.zeros_like(far_idx_bf))  # (raw keys: the query's offset is the distance)
  return bw.update(state, bw.scores(q_far, far_tile, pe), far_v, mask_bcf)


def select_blocks(q_bcnh, idx_bc, rk_bnph, formed_b, kv: int, pe, spec) -> jnp.ndarray:
  """The chunk's top_k blocks [B, min(top_k, P)] by the sum over query heads of its mean far query
  (rotated at n_local-1; real queries only) . representative key; -1 where fewer are formed.
  (kv: the kv heads.)"""
  b, c, n, h = q_bcnh.shape
  n_pool = rk_bnph.shape[2]
  q_far_bkmh = bw.query_tile(q_bcnh, jnp.full_like(idx_bc, spec.n_local - 1), pe, kv).x
  real_b1c = (idx_bc >= 0)[:, None, :].astype(jnp.float32)
  q_bkgh = jnp.einsum("bkgch,bxc->bkgh", q_far_bkmh.reshape(b, kv, n // kv, c, h).astype(jnp.float32), real_b1c)
  q_bkgh /= jnp.maximum(real_b1c.sum(-1), 1)[:, :, None, None]
  score_bp = jnp.einsum("bkgh,bkgph->bp", q_bkgh, rk_bnph.reshape(b, kv, n // kv, n_pool, h).astype(jnp.float32))
  score_bp = jnp.where(jnp.arange(n_pool) < formed_b[:, None], score_bp, -jnp.inf)
  _, sel_bk = jax.lax.top_k(score_bp, min(spec.top_k, n_pool))  # ties: the lower block
  return jnp.where(sel_bk < formed_b[:, None], sel_bk, -1)


def block_keys(k_bkxh, v_bkxh, slot_bk, block_bk, spec) -> Keys:
  """The keys of blocks block_bk [B, k] (-1: none), read from slots slot_bk of a store [B, K, X, H]
  (the pool, or the device's `Held` blocks): Keys [B, K, k*bs, H] at their sequence indices
  (-1 for no block)."""
  b, bs = block_bk.shape[0], spec.block_size
  at_bx = (jnp.maximum(slot_bk, 0)[:, :, None] * bs + jnp.arange(bs)).reshape(b, -1)
  k_bkxh, v_bkxh = (jnp.take_along_axis(x, at_bx[:, None, :, None], axis=2) for x in (k_bkxh, v_bkxh))
  idx_bx = (block_bk[:, :, None] * bs + spec.n_init + jnp.arange(bs)).reshape(b, -1)
  idx_bx = jnp.where(jnp.repeat(block_bk >= 0, bs, axis=1), idx_bx, -1)
  return Keys(k_bkxh, v_bkxh, jnp.zeros_like(idx_bx), idx_bx)


def cached_blocks(q_bcnh, idx_bc, cached: CachedLayer, pe, spec) -> tuple[Keys | None, Held]:
  """A cached chunk's selected blocks (`select_blocks`), read from the pool, or with offload from
  the device's blocks after copying in those it lacks (`fetch`): (their Keys, or None with no
  pool; the device's blocks after the chunk)."""
  extra, formed_b = cached.extra, cached.shared
  if not extra.pool_rk.shape[2]:
    return None, extra.held
  sel_bk = select_blocks(q_bcnh, idx_bc, extra.pool_rk, formed_b, cached.ring.k_bklh.shape[1], pe, spec)
  if not on_host(extra.pool_k):  # (offload places it in host memory: `init_extra`)
    return block_keys(extra.pool_k, extra.pool_v, sel_bk, sel_bk, spec), extra.held
  held, slot_bk = fetch(extra.held, sel_bk, extra.pool_k, extra.pool_v, cached.layer_at, cached.next_idx_b,
                        spec.block_size)
  return block_keys(held.k_bkxh, held.v_bkxh, slot_bk, sel_bk, spec), held


def infllm_attention(q_btnh, k_btkh, v_btkh, positions_bt, pe, spec,
                     kernel: FlashKernel | None = None) -> jnp.ndarray:
  """One-shot: q [B,T,N,H], k/v [B,T,K,H] before RoPE, positions [B,T] (negative = left padding)
  -> [B,T,N,H]. A scan over chunks whose carry is every key's column sum [B,N,T]. With a flash
  `kernel`, the local branch of every chunk is one kernel call up front; the scan merges it with
  the far branch and still computes the local scores for the column sums."""
  b, t, n, h = q_btnh.shape
  if kernel is not None:
    local_btnh, local_btn = flash_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, spec.n_local, kernel)
  # Left-padded rows are rotated to start at index 0, so chunks and blocks line up in every row
  # (the padding, now at the end, lies in every real query's future).
  pad_b = jnp.sum(positions_bt < 0, axis=1, dtype=jnp.int32)
  length_b = t - pad_b
  q_btnh, k_btkh, v_btkh = (bw.roll_padding(x, pad_b) for x in (q_btnh, k_btkh, v_btkh))
  local_chunks = () if kernel is None else tuple(  # (padding queries: out 0, lse -inf)
      bw.split_chunks(bw.pad_axis(bw.roll_padding(x, pad_b), 1, 0, -t % min(spec.chunk, t), fill),
                      min(spec.chunk, t))
      for x, fill in ((local_btnh, 0.0), (local_btn, -jnp.inf)))
  # Positions after a row's end count on from its last token (RoPE offsets stay small).
  pos_bt = bw.roll_padding(positions_bt, pad_b)
  after_bt = jnp.arange(t) - length_b[:, None] + 1
  last_b1 = jnp.take_along_axis(pos_bt, jnp.maximum(length_b - 1, 0)[:, None], axis=1)
  pos_bt = jnp.where(after_bt > 0, last_b1 + after_bt, pos_bt)
  idx_bt = jnp.where(after_bt > 0, -1, jnp.arange(t, dtype=jnp.int32))

  c = min(spec.chunk, t)
  t_pad = -(-t // c) * c
  w = context_window(spec)
  n_pool = pool_blocks(t, spec)
  # Keys [B, K, W + t_pad + n_init, H]: slot W + j holds token j; chunk ci's context starts at slot ci*C.
  keys = Keys(*(bw.pad_axis(jnp.swapaxes(x, 1, 2), 2, w, t_pad - t + spec.n_init) for x in (k_btkh, v_btkh)),
              bw.pad_axis(pos_bt, 1, w, t_pad - t + spec.n_init),
              bw.pad_axis(idx_bt, 1, w, t_pad - t + spec.n_init, -1))
  init = keys.slice(w, w + spec.n_init)
  first = w + spec.n_init
  pool_k, pool_v = (x[:, :, first:first + n_pool * spec.block_size] for x in keys[:2])

  def chunk_step(colsum_bnl, xs):
    ci, q_bcnh, pos_bc, idx_bc, *local = xs
    context = Keys(*(jax.lax.dynamic_slice_in_dim(x, ci * c, w + c, axis=2) for x in keys[:2]),
                   *(jax.lax.dynamic_slice_in_dim(x, ci * c, w + c, axis=1) for x in keys[2:]))
    formed_b = jnp.full((b,), blocks_formed(ci * c, spec))
    blocks = None
    if n_pool:
      rk_bnph = representative_keys(colsum_bnl[:, :, first:first + n_pool * spec.block_size], pool_k,
                                    spec.repr_tokens, spec.block_size)
      sel_bk = select_blocks(q_bcnh, idx_bc, rk_bnph, formed_b, k_btkh.shape[2], pe, spec)
      blocks = block_keys(pool_k, pool_v, sel_bk, sel_bk, spec)
    out_bcnh, colsum_bnx = infllm_chunk(q_bcnh, pos_bc, idx_bc, context, init, blocks, formed_b, pe, spec,
                                        tuple(local) or None)
    old_bnx = jax.lax.dynamic_slice_in_dim(colsum_bnl, ci * c, w + c, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(colsum_bnl, old_bnx + colsum_bnx, ci * c, axis=2), out_bcnh

  pad = t_pad - t
  xs = (jnp.arange(t_pad // c), bw.split_chunks(bw.pad_axis(q_btnh, 1, 0, pad), c),
        bw.split_chunks(bw.count_on(pos_bt, pad), c), bw.split_chunks(bw.pad_axis(idx_bt, 1, 0, pad, -1), c),
        *local_chunks)
  colsum_bnl = jnp.zeros((b, n, keys.idx_bl.shape[1]), jnp.float32)
  _, out_nbcnh = jax.lax.scan(jax.checkpoint(chunk_step), colsum_bnl, xs)
  return bw.roll_padding(bw.unsplit_chunks(out_nbcnh, t), -pad_b)


def infllm_one(q_b1nh, new: Keys, cached: CachedLayer, blocks: Keys | None, pe, spec: InfLLM):
  """`infllm_chunk` for one query per row, with the ring read where it lies (its rotated copy):
  (out [B, 1, N, H], local probability sums [B, N, W+1] of the ring, oldest first, and the query's
  own key). One pass: a single query's softmax needs no blocks of keys."""
  b, _, n, _ = q_b1nh.shape
  raw = cached.ring  # raw keys at their positions
  kv_heads, ring_len = raw.k_bklh.shape[1], raw.k_bklh.shape[2]
  pos_b1, idx_b1 = new.pos_bl, new.idx_bl
  order_bw = cached.ring_order()
  pending = raw.take(order_bw[:, :spec.block_size + 1])
  state = bw.init_state(bw.tile_rows(q_b1nh, kv_heads))
  state = add_far_keys(state, q_b1nh, pos_b1, idx_b1, pending, cached.slots, blocks, cached.shared, pe, spec)
  rotated = Keys(cached.extra.ring_rk, raw.v_bklh, ring.anchors(raw.pos_bl, ring_len, pe), raw.idx_bl)
  s_bkgw = ring.ring_scores(q_b1nh, pos_b1, rotated, pe)
  local_b1w = bw.visible(idx_b1, raw.idx_bl, spec.n_local)
  state = bw.update(state, s_bkgw, raw.v_bklh, local_b1w)
  s_own_bkg1 = ring.own_key_scores(q_b1nh, new, pe)
  state = bw.update(state, s_own_bkg1, new.v_bklh, (idx_b1 >= 0)[:, :, None])
  out_b1nh, lse_b1n = bw.finish(state, 1, q_b1nh.dtype)
  lse_bkg1 = lse_b1n.reshape(b, kv_heads, -1, 1)
  lse_bkg1 = jnp.where(jnp.isfinite(lse_bkg1), lse_bkg1, 0)
  p_bkgw = jnp.where(local_b1w[:, None], jnp.exp(s_bkgw - lse_bkg1), 0)
  p_bkg1 = jnp.where((idx_b1 >= 0)[:, None, None], jnp.exp(s_own_bkg1 - lse_bkg1), 0)
  p_bnw = jnp.take_along_axis(p_bkgw.reshape(b, n, ring_len), order_bw[:, None], axis=2)
  return out_b1nh, jnp.concatenate([p_bnw, p_bkg1.reshape(b, n, 1)], axis=2)


def form_blocks(cached: CachedLayer, new: Keys, colsum_lbnx, next_idx_b, spec: InfLLM) -> tuple[InfLLMCache,
                                                                                                 jnp.ndarray]:
  """Adds the chunk's probability sums [L, B, N, W+C] to the ring's, and moves every block
  completed by the chunk (keys [L, B, C, K, H]) to the pool with its representative keys:
  (extra, blocks formed [B]). A block token from before the chunk is at ring slot idx % W (it is
  still in the ring: W = n_local + block_size); one of the chunk is at its place in the chunk,
  whose real tokens may follow padding. (X: a block's tokens; M: the blocks it may complete.)"""
  extra, formed_b0, next_idx_b0 = cached.extra, cached.shared, cached.next_idx_b
  ring_len, c = cached.ring.idx_bl.shape[1], new.idx_bl.shape[1]
  n_pool, bs = extra.pool_rk.shape[3], spec.block_size
  slot_to_entry_bw = (jnp.arange(ring_len) - next_idx_b0[:, None]) % ring_len
  ring_colsum = extra.ring_colsum + jnp.take_along_axis(colsum_lbnx[..., :ring_len], slot_to_entry_bw[None, :, None],
                                                        axis=-1)
  # Blocks formed + m for m < C/bs + 2 (at most that many complete in one chunk).
  formed_b = blocks_formed(next_idx_b, spec)
  block_bm = formed_b0[:, None] + jnp.arange(c // bs + 2)
  token_bx = (spec.n_init + block_bm[:, :, None] * bs + jnp.arange(bs)).reshape(block_bm.shape[0], -1)
  in_ring_bx = token_bx < next_idx_b0[:, None]
  first_real_b1 = jnp.argmax(new.idx_bl >= 0, axis=1)[:, None]
  at_chunk_bx = jnp.clip(token_bx - next_idx_b0[:, None] + first_real_b1, 0, c - 1)

  def gather(ring_x, chunk_x):  # [L, B, *, W or C, H] -> the block tokens [L, B, *, X, H]
    at = lambda at_bx: at_bx[None, :, None, :, None]  # noqa: E731
    return jnp.where(at(in_ring_bx), jnp.take_along_axis(ring_x, at(token_bx % ring_len), axis=3),
                     jnp.take_along_axis(chunk_x, at(at_chunk_bx), axis=3))

  keep_bm = block_bm < jnp.minimum(formed_b, n_pool)[:, None]
  host = on_host(extra.pool_k)

  def move(arrays):
    """(pool_k, pool_v, pool_rk) with the completed blocks stored. With the pool in host memory:
    (their keys, their values [L, B, K, X, H], pool_rk); `store_blocks` copies them out after the
    cond, so that no host array passes through it."""
    pool_k, pool_v, pool_rk = arrays
    k_lbkxh = gather(cached.ring.k_bklh, jnp.swapaxes(new.k_bklh, 2, 3))
    v_lbkxh = gather(cached.ring.v_bklh, jnp.swapaxes(new.v_bklh, 2, 3))
    block_colsum_lbnx = gather(ring_colsum[..., None], colsum_lbnx[..., ring_len:, None])[..., 0]
    rk_lbnmh = representative_keys(block_colsum_lbnx, k_lbkxh, spec.repr_tokens, bs)
    b_b1 = jnp.arange(block_bm.shape[0])[:, None]
    at_bm = jnp.where(keep_bm, block_bm, n_pool)
    at_bx = jnp.where(jnp.repeat(keep_bm, bs, axis=1), token_bx - spec.n_init, n_pool * bs)
    put = lambda x, at, y: x.at[:, b_b1, :, at].set(jnp.moveaxis(y, (0, 2), (2, 3)), mode="drop")  # noqa: E731
    if host:
      return k_lbkxh, v_lbkxh, put(pool_rk, at_bm, rk_lbnmh)
    return put(pool_k, at_bx, k_lbkxh), put(pool_v, at_bx, v_lbkxh), put(pool_rk, at_bm, rk_lbnmh)

  # Most decode steps complete no block: they skip the gathers and the pool writes. (Only the
  # pool, or the blocks, pass through the cond: XLA copies whatever a cond returns unchanged.)
  arrays = (extra.pool_k, extra.pool_v, extra.pool_rk)
  if host:
    blocks = jax.eval_shape(move, arrays)[:2]
    arrays = (*(jnp.zeros(x.shape, x.dtype) for x in blocks), extra.pool_rk)
  pool_k, pool_v, pool_rk = jax.lax.cond(jnp.any(formed_b > formed_b0), move, lambda arrays: arrays, arrays)
  if host:
    pool_k, pool_v = (store_blocks(pool, x, block_bm, keep_bm, bs) for pool, x in ((extra.pool_k, pool_k),
                                                                                    (extra.pool_v, pool_v)))
  return extra._replace(ring_colsum=ring_colsum, pool_k=pool_k, pool_v=pool_v, pool_rk=pool_rk), formed_b
