"""InfLLM's memory blocks in host memory (`InfLLM(offload=True)`): the device's cache of blocks
(`Held`), the copies into it of the blocks a chunk selects that it lacks (`fetch`, LRU), and the
copies out of the blocks a chunk forms (`store_blocks`). Only dynamic slices of one block touch
host memory, each moved across with `jax.device_put`; on a mesh, on each device's own rows and kv
heads (`per_shard`). docs/memory.md#infllm-in-host-memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.sharding import per_shard
from lminf_jax.util.limits import INT32_MAX


class Held(NamedTuple):
  """The device's copies of memory blocks when the pool is offloaded (D slots; D = 0 without
  offload): keys and values [B, K, D*bs, H] (slot d at [d*bs, (d+1)*bs)), the pool block each
  slot holds [B, D] (-1: none), the sequence index of the chunk that last used it [B, D] (-1:
  never) and how many blocks were copied in so far [B]."""

  k_bkxh: jnp.ndarray
  v_bkxh: jnp.ndarray
  block_bd: jnp.ndarray
  used_bd: jnp.ndarray
  fetched_b: jnp.ndarray


def fetch(held: Held, want_bk, pool_k, pool_v, at, now_b, block_size: int) -> tuple[Held, jnp.ndarray]:
  """Puts the wanted blocks want_bk [B, k] (-1: none) on the device: a block it holds stays in its
  slot; each other one is copied from layer `at` of the host pool [L, B, K, P*bs, H] into the
  least recently used slot that holds no wanted block (empty slots first; ties: the lower slot).
  Every wanted block's slot is stamped with now_b [B]. Needs D >= k. (held after, the slot of each
  wanted block [B, k])."""
  b, k = want_bk.shape
  d = held.block_bd.shape[1]
  wanted_bk = want_bk >= 0
  hit_bkd = (held.block_bd[:, None, :] == want_bk[:, :, None]) & wanted_bk[:, :, None]
  hit_bk, kept_bd = hit_bkd.any(2), hit_bkd.any(1)
  free_bd = jnp.argsort(jnp.where(kept_bd, INT32_MAX, held.used_bd), axis=1, stable=True)
  miss_bk = wanted_bk & ~hit_bk
  rank_bk = jnp.clip(jnp.cumsum(miss_bk, axis=1) - 1, 0, d - 1)
  slot_bk = jnp.where(hit_bk, jnp.argmax(hit_bkd, axis=2), jnp.take_along_axis(free_bd, rank_bk, axis=1))
  b_b1 = jnp.arange(b)[:, None]
  block_bd = held.block_bd.at[b_b1, jnp.where(miss_bk, slot_bk, d)].set(want_bk, mode="drop")
  used_bd = held.used_bd.at[b_b1, jnp.where(wanted_bk, slot_bk, d)].set(jnp.broadcast_to(now_b[:, None], (b, k)),
                                                                        mode="drop")
  pool_axes = (None, *_KV, None)
  k_bkxh, v_bkxh = per_shard(functools.partial(_copy_in, block_size=block_size),
                             (held.k_bkxh, held.v_bkxh, pool_k, pool_v, jnp.asarray(at, jnp.int32), miss_bk, want_bk,
                              slot_bk), (_KV, _KV, pool_axes, pool_axes, ()) + (_ROWS,) * 3, (_KV, _KV))
  return Held(k_bkxh, v_bkxh, block_bd, used_bd, held.fetched_b + miss_bk.sum(1, dtype=jnp.int32)), slot_bk


_KV = ("cache_batch", "cache_heads", None, None)  # (per_shard's logical axes of [B, K, X, H] and [B, k])
_ROWS = ("cache_batch", None)


def _copy_in(held_k, held_v, pool_k, pool_v, layer, miss_bk, want_bk, slot_bk, block_size: int):
  """The copies of `fetch` on one shard: block want_bk[b, i] of the host pool's layer `layer` into
  slot slot_bk[b, i] of the device's, for each miss: one dynamic slice each, of one block (nothing
  else runs in host memory)."""
  k = miss_bk.shape[1]
  order_x = jnp.argsort(~miss_bk.reshape(-1), stable=True)  # (the misses first)
  size = (1, 1, pool_k.shape[2], block_size, pool_k.shape[4])

  def one(i, kv):
    row, j = order_x[i] // k, order_x[i] % k
    at, to = (layer, row, 0, want_bk[row, j] * block_size, 0), (row, 0, slot_bk[row, j] * block_size, 0)
    read = lambda p: jax.device_put(jax.lax.dynamic_slice(p, at, size), jax.memory.Space.Device)[0]  # noqa: E731
    return tuple(jax.lax.dynamic_update_slice(h, read(p), to) for h, p in zip(kv, (pool_k, pool_v)))

  return jax.lax.fori_loop(0, miss_bk.sum(dtype=jnp.int32), one, (held_k, held_v))


def store_blocks(pool_lbkxh, new_lbkxh, block_bm, keep_bm, block_size: int) -> jnp.ndarray:
  """Copies the newly formed blocks m of each row (keys or values new [L, B, K, M*bs, H], those
  with keep_bm [B, M]) to their places block_bm [B, M] in the host pool [L, B, K, P*bs, H], every
  layer's at once: one dynamic update slice per block, on each shard of rows and heads."""

  def local(pool_lbkxh, new_lbkxh, block_bm, keep_bm):
    m = keep_bm.shape[1]
    order_x = jnp.argsort(~keep_bm.reshape(-1), stable=True)  # (the kept blocks first)
    size = (new_lbkxh.shape[0], 1, new_lbkxh.shape[2], block_size, new_lbkxh.shape[4])

    def one(i, pool_lbkxh):
      row, j = order_x[i] // m, order_x[i] % m
      block = jax.lax.dynamic_slice(new_lbkxh, (0, row, 0, j * block_size, 0), size)
      return jax.lax.dynamic_update_slice(pool_lbkxh, jax.device_put(block, jax.memory.Space.Host),
                                          (0, row, 0, block_bm[row, j] * block_size, 0))

    return jax.lax.fori_loop(0, keep_bm.sum(dtype=jnp.int32), one, pool_lbkxh)

  layers = (None,) + _KV[:2] + (None, None)
  return per_shard(local, (pool_lbkxh, new_lbkxh, block_bm, keep_bm), (layers, layers, _ROWS, _ROWS), layers)
