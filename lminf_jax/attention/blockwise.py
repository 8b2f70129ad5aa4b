"""Flash-style building blocks shared by every attention method.

Axis letters: B batch, T length, C query-chunk length, S key-block length, K kv heads,
G query heads per kv head, H head dim, N = K*G query heads, M = G*C rows of one kv head's
query tile (row m = g*C + c), so each score tile is one batched matmul [M, H] x [H, S].

A query chunk's attention is accumulated over key blocks with an online softmax (float32
running max `m`, normaliser `l` and weighted sum `acc`), so no [T, T] score matrix exists.
Masks use sequence indices (`idx`: 0 at a row's first real token, negative for left padding);
positions only enter through the positional scheme `pe` (lminf_jax.positional), always as small
offsets from a per-chunk reference that `Tile`s carry to `scores`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.positional import Positional
from lminf_jax.sharding import on_host

# Index given to padding keys past the end: in every real query's future.
FUTURE = 2**30


class Keys(NamedTuple):
  """Keys and values [B, K, L, H] with RoPE positions and sequence indices [B, L] (idx < 0: not a
  key). Raw keys (before RoPE) at their positions, or keys stored rotated from an anchor position
  (a cache's ring). With a leading layer axis, keys and values are [L', B, L, K, H] (a cache write)."""

  k_bklh: jnp.ndarray
  v_bklh: jnp.ndarray
  pos_bl: jnp.ndarray
  idx_bl: jnp.ndarray

  def pad(self, before: int, after: int) -> "Keys":
    """Adds invalid slots: idx -1 before, FUTURE after (in every query's future)."""
    return Keys(pad_axis(self.k_bklh, 2, before, after), pad_axis(self.v_bklh, 2, before, after),
                pad_axis(self.pos_bl, 1, before, after),
                pad_axis(pad_axis(self.idx_bl, 1, before, 0, -1), 1, 0, after, FUTURE))

  def slice(self, start: int, stop: int) -> "Keys":
    """Entries [start, stop) (static bounds)."""
    return Keys(self.k_bklh[:, :, start:stop], self.v_bklh[:, :, start:stop], self.pos_bl[:, start:stop],
                self.idx_bl[:, start:stop])

  def take(self, at_bl: jnp.ndarray) -> "Keys":
    """Entries at_bl [B, L'] of each row."""
    return Keys(*(jnp.take_along_axis(x, at_bl[:, None, :, None], axis=2) for x in (self.k_bklh, self.v_bklh)),
                *(jnp.take_along_axis(x, at_bl, axis=1) for x in (self.pos_bl, self.idx_bl)))

  def put(self, at_bc: jnp.ndarray, new: "Keys") -> "Keys":
    """Entry c of `new` (keys [B, K, C, H]) written to slot at_bc[:, c] (out of range: dropped)."""
    b_b1 = jnp.arange(at_bc.shape[0])[:, None]
    put = lambda x, y: x.at[b_b1, :, at_bc].set(jnp.swapaxes(y, 1, 2), mode="drop")  # noqa: E731
    return Keys(put(self.k_bklh, new.k_bklh), put(self.v_bklh, new.v_bklh),
                self.pos_bl.at[b_b1, at_bc].set(new.pos_bl, mode="drop"),
                self.idx_bl.at[b_b1, at_bc].set(new.idx_bl, mode="drop"))

  def concat(self, other: "Keys") -> "Keys":
    """These entries, then `other`'s."""
    return Keys(*(jnp.concatenate([a, b], axis=2) for a, b in ((self.k_bklh, other.k_bklh),
                                                               (self.v_bklh, other.v_bklh))),
                *(jnp.concatenate([a, b], axis=1) for a, b in ((self.pos_bl, other.pos_bl),
                                                               (self.idx_bl, other.idx_bl))))


def scatter_layers(x_lbksh: jnp.ndarray, at_bc: jnp.ndarray, y_lbckh: jnp.ndarray) -> jnp.ndarray:
  """x[:, b, :, at[b, c]] = y[:, b, c] for every layer (out-of-range slots dropped)."""
  b_b1 = jnp.arange(at_bc.shape[0])[:, None]  # x[:, b, :, at] has shape [B, C, L, K, H]
  return x_lbksh.at[:, b_b1, :, at_bc].set(jnp.moveaxis(y_lbckh, 0, 2), mode="drop")


def after(x: jnp.ndarray, *deps) -> jnp.ndarray:
  """x, with a zero data dependency on every array of `deps` (pytrees): XLA then schedules the
  ops that consume the result after the ops that produce `deps`. Used to order a cache's in-place
  writes after its reads; otherwise XLA may write first and copy the cache to keep the old one
  for the reads (an optimization barrier does not order XLA:CPU's copy insertion). Arrays in
  host memory are left out (no arithmetic runs there)."""
  leaves = [leaf for leaf in jax.tree.leaves(deps) if leaf.size and not on_host(leaf)]
  return x + sum(0 * jnp.sum(leaf.reshape(-1)[:1]).astype(x.dtype) for leaf in leaves) if leaves else x


class SoftmaxState(NamedTuple):
  m_bkm: jnp.ndarray
  l_bkm: jnp.ndarray
  acc_bkmh: jnp.ndarray


def init_state(q_bkmh: jnp.ndarray) -> SoftmaxState:
  """The empty softmax of a query tile [B, K, M, H], typed as the tile is (inside a shard_map:
  varying over the same mesh axes, so a scan or cond that carries it keeps one type)."""
  zeros_bkmh = jnp.zeros_like(q_bkmh, jnp.float32)
  return SoftmaxState(zeros_bkmh[..., 0] - jnp.inf, zeros_bkmh[..., 0], zeros_bkmh)


class Tile(NamedTuple):
  """Queries [B, K, M, H] or keys [B, K, S, H] rotated by `pe`, with the offsets [B, M] / [B, S]
  they were rotated by (ALiBi's bias needs them)."""

  x: jnp.ndarray
  off: jnp.ndarray


def tile_rows(q_bcnh: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
  """Queries [B, C, N, H] as the rows of their kv heads' tiles [B, K, G*C, H] (row m = g*C + c)."""
  b, c, n, h = q_bcnh.shape
  return q_bcnh.reshape(b, c, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, h)


def query_tile(q_bcnh: jnp.ndarray, offsets_bc: jnp.ndarray, pe: Positional, kv_heads: int) -> Tile:
  """Rotates queries by `offsets` and scales by 1/sqrt(H): [B, C, N, H] -> [B, K, G*C, H]."""
  n, h = q_bcnh.shape[2:]
  q_bcnh = pe.rotate(q_bcnh, offsets_bc[:, :, None]) * h**-0.5
  return Tile(tile_rows(q_bcnh, kv_heads), jnp.tile(offsets_bc, (1, n // kv_heads)))


def key_tile(k_bksh: jnp.ndarray, offsets_bs: jnp.ndarray, pe: Positional) -> Tile:
  """Keys [B, K, S, H] rotated by `offsets` [B, S]."""
  return Tile(pe.rotate(k_bksh, offsets_bs[:, None]), offsets_bs)


def scores(q: Tile, k: Tile, pe: Positional) -> jnp.ndarray:
  """Float32 logits [B, K, M, S] (with the scheme's bias and soft-cap)."""
  s_bkms = jnp.einsum("bkmh,bksh->bkms", q.x, k.x, preferred_element_type=jnp.float32)
  return pe.logits(s_bkms, q.off, k.off)


def update(state: SoftmaxState, s_bkms: jnp.ndarray, v_bksh: jnp.ndarray,
           mask_bcs: jnp.ndarray | None) -> SoftmaxState:
  """Folds one key block (logits, values, [B, C, S] mask shared by the G heads; None: every key
  visible) into the softmax."""
  b, k, m, s = s_bkms.shape
  if mask_bcs is not None:
    c = mask_bcs.shape[1]
    s_bkms = jnp.where(mask_bcs[:, None, None], s_bkms.reshape(b, k, m // c, c, s), -jnp.inf).reshape(b, k, m, s)
  # The result does not depend on the shift m, so it needs no gradient (and -inf - -inf never happens).
  m_new = jax.lax.stop_gradient(jnp.maximum(state.m_bkm, s_bkms.max(-1)))
  m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  p_bkms = jnp.exp(s_bkms - m_safe[..., None])
  correction = jnp.exp(state.m_bkm - m_safe)
  pv_bkmh = jnp.einsum("bkms,bksh->bkmh", p_bkms.astype(v_bksh.dtype), v_bksh, preferred_element_type=jnp.float32)
  return SoftmaxState(m_new, state.l_bkm * correction + p_bkms.sum(-1),
                      state.acc_bkmh * correction[..., None] + pv_bkmh)


def visible(idx_bc: jnp.ndarray, idx_bs: jnp.ndarray, window: int = FUTURE, min_dist: int = 0) -> jnp.ndarray:
  """[B, C, S]: query i sees key j iff min_dist <= i-j < window and j is a real key (0 <= j < FUTURE)."""
  dist_bcs = idx_bc[:, :, None] - idx_bs[:, None, :]
  return (dist_bcs >= min_dist) & (dist_bcs < window) & ((idx_bs >= 0) & (idx_bs < FUTURE))[:, None, :]


def fold_block(state: SoftmaxState, scores_and_values, idx_bc: jnp.ndarray, idx_bs: jnp.ndarray,
               window: int = FUTURE) -> SoftmaxState:
  """Folds a key block (sequence indices idx_bs [B, S]) into a query chunk's softmax (idx_bc [B, C]),
  each query seeing the keys `visible` says.

  `scores_and_values() -> (logits [B,K,M,S], values [B,K,S,H])` runs only if some query may see
  the block; when every query sees every key (most blocks of a long band), the block is folded
  without a mask, which saves about 8% of a 16K-token lambda layer."""
  real_bs = (idx_bs >= 0) & (idx_bs < FUTURE)
  k_lo_b = jnp.min(jnp.where(real_bs, idx_bs, FUTURE), axis=1)
  k_hi_b = jnp.max(jnp.where(real_bs, idx_bs, -1), axis=1)
  q_lo_b, q_hi_b = idx_bc.min(axis=1), idx_bc.max(axis=1)
  maybe_seen = jnp.any((k_lo_b <= q_hi_b) & (q_lo_b - k_hi_b < window))
  all_seen = jnp.all(real_bs.all(axis=1) & (q_lo_b >= k_hi_b) & (q_hi_b - k_lo_b < window))

  def masked(st):
    return update(st, *scores_and_values(), visible(idx_bc, idx_bs, window))

  def fold(st):
    return jax.lax.cond(all_seen, lambda st: update(st, *scores_and_values(), None), masked, st)

  return jax.lax.cond(maybe_seen, fold, lambda st: st, state)


def finish(state: SoftmaxState, chunk: int, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(output [B, C, N, H], log-sum-exp [B, C, N]); a query with no allowed key gives 0."""
  b, k, m, h = state.acc_bkmh.shape
  seen = state.l_bkm > 0
  l_bkm = jnp.where(seen, state.l_bkm, 1.0)
  o_bkmh = state.acc_bkmh / l_bkm[..., None]
  lse_bkm = jnp.where(seen, state.m_bkm + jnp.log(l_bkm), -jnp.inf)
  o_bcnh = o_bkmh.reshape(b, k, m // chunk, chunk, h).transpose(0, 3, 1, 2, 4).reshape(b, chunk, -1, h)
  lse_bcn = lse_bkm.reshape(b, k, m // chunk, chunk).transpose(0, 3, 1, 2).reshape(b, chunk, -1)
  return o_bcnh.astype(dtype), lse_bcn


def over_query_chunks(chunk_step, q_btnh: jnp.ndarray, positions_bt: jnp.ndarray, idx_bt: jnp.ndarray,
                      chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Runs `chunk_step(ci, q [B,C,N,H], positions [B,C], idx [B,C]) -> (out [B,C,N,H], lse [B,C,N])`
  over query chunks of C = min(chunk, T) in a rematerialised `lax.scan`: (out [B,T,N,H], lse [B,T,N]).
  The last chunk is padded with positions and indices that count on; its padded rows are dropped."""
  t = q_btnh.shape[1]
  c = min(chunk, t)
  pad = -t % c
  xs = (jnp.arange((t + pad) // c),) + tuple(
      split_chunks(x, c) for x in (pad_axis(q_btnh, 1, 0, pad), count_on(positions_bt, pad), count_on(idx_bt, pad)))
  _, (o_nbcnh, lse_nbcn) = jax.lax.scan(jax.checkpoint(lambda _, xs: (None, chunk_step(*xs))), None, xs)
  return unsplit_chunks(o_nbcnh, t), unsplit_chunks(lse_nbcn, t)


def roll_padding(x_bt: jnp.ndarray, pads_b: jnp.ndarray) -> jnp.ndarray:
  """Each row [B, T, ...] rolled left by its `pads_b` [B]: column c holds entry (c + pads) % T, so
  a row's left padding moves to its end (into every real query's future); -pads rolls it back."""
  t = x_bt.shape[1]
  from_bt = (jnp.arange(t)[None] + pads_b[:, None]) % t
  return jnp.take_along_axis(x_bt, from_bt.reshape(from_bt.shape + (1,) * (x_bt.ndim - 2)), axis=1)


def count_on(x_bt: jnp.ndarray, pad: int) -> jnp.ndarray:
  """Appends `pad` columns that continue each row's count (last value + 1, + 2, ...)."""
  return jnp.concatenate([x_bt, x_bt[:, -1:] + 1 + jnp.arange(pad, dtype=x_bt.dtype)], axis=1)


def sequence_index(positions_bt: jnp.ndarray) -> jnp.ndarray:
  """Index of each token in its row's sequence: 0 at the first real token, negative for left padding."""
  t = positions_bt.shape[1]
  return jnp.arange(t, dtype=jnp.int32)[None] - jnp.sum(positions_bt < 0, axis=1, dtype=jnp.int32)[:, None]


def key_block(k_bkth, v_bkth, positions_bt, start, size: int, ref_b1,
              pe: Positional) -> tuple[Tile, Tile, jnp.ndarray]:
  """Slices keys [start, start+size): (keys rotated relative to ref, raw keys at offset 0, values [B,K,S,H])."""
  k_bksh, v_bksh = (jax.lax.dynamic_slice_in_dim(x, start, size, axis=2) for x in (k_bkth, v_bkth))
  pos_bs = jax.lax.dynamic_slice_in_dim(positions_bt, start, size, axis=1)
  return key_tile(k_bksh, pos_bs - ref_b1, pe), Tile(k_bksh, jnp.zeros_like(pos_bs)), v_bksh


def unsplit_chunks(x_nbc: jnp.ndarray, length: int) -> jnp.ndarray:
  """Scan output [n, B, C, ...] -> [B, T, ...] cut back to the unpadded length."""
  x_bnc = jnp.moveaxis(x_nbc, 0, 1)
  return x_bnc.reshape((x_bnc.shape[0], -1) + x_bnc.shape[3:])[:, :length]


def split_chunks(x_bt: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """[B, T, ...] with T = n*C -> [n, B, C, ...] (the scan axis first)."""
  b, t = x_bt.shape[:2]
  return jnp.moveaxis(x_bt.reshape((b, t // chunk, chunk) + x_bt.shape[2:]), 1, 0)


def pad_axis(x: jnp.ndarray, axis: int, before: int, after: int, value=0) -> jnp.ndarray:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (before, after)
  return jnp.pad(x, widths, constant_values=value)


def pad_to_multiple(x_bt: jnp.ndarray, multiple: int, value=0) -> jnp.ndarray:
  """Pads axis 1 at the end up to a multiple of `multiple`."""
  return pad_axis(x_bt, 1, 0, -x_bt.shape[1] % multiple, value)
