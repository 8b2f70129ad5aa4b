"""Dual Chunk Attention through Pallas splash (TPU; interpret mode elsewhere): its three placements
as three kernel calls, merged by log-sum-exp (docs/kernels.md#flash-kernels-tpu-and-gpu).

Intra-chunk and successive-chunk pairs are causal pairs whose chunks (p // c) differ by 0 and by 1:
each is one causal call over the row (rolled so its left padding moves to its end, as
kernels.flash_band), with splash's segment ids as data: a query's id is its chunk less 0 or 1, a
key's its chunk. Inter-chunk pairs (key chunk <= query chunk - 2) need the chunks in the mask
itself: that call lays a row out in segments of `width` columns (c rounded up to the block
multiple), one per chunk counted from the row's first, each token at its position within the
chunk (less the row's first, in the first segment), and masks segments (`SegmentMask`); no call
when T <= c (no row of contiguous positions spans three chunks), and XLA's where positions skip so
that a row spans more chunks than that layout holds (`lax.cond`). Queries and keys are rotated by the
placement's offsets, all within [0, chunk_size] (exact). A query that a placement gives no key
(its row's first chunk or two) gets 0 and lse -inf from it. L: a call's columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.kernels import ALIGN, Splash, merge
from lminf_jax.positional import Positional

PAD_Q, PAD_KV = -10, -20  # segment ids of padding (real ids are chunks, or chunks less 1: never below -1)


@functools.cache
def _segment_mask_class() -> type:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  class SegmentMask(masks._ComputableMask):  # (splash's base class of masks computed inside the kernel)
    """Keys two or more segments of `width` columns before the query's."""

    def __init__(self, shape: tuple[int, int], width: int):
      self.width = width
      super().__init__(shape, lambda q, kv: kv // width <= q // width - 2)

    def __getitem__(self, idx) -> np.ndarray:
      """A block (the kernel's blocks divide `width`, so each lies in one segment of rows and one of
      columns): one value (splash classifies every block by its values)."""
      q, kv = idx
      if isinstance(q, slice) and isinstance(kv, slice) and q.step is kv.step is None:
        return np.broadcast_to(np.bool_(kv.start // self.width <= q.start // self.width - 2),
                               (q.stop - q.start, kv.stop - kv.start))
      return super().__getitem__(idx)

    def __eq__(self, other) -> bool:
      return type(other) is type(self) and (self.shape, self.width) == (other.shape, other.width)

    def __hash__(self) -> int:
      return hash((type(self), self.shape, self.width))

  return SegmentMask


def dca_splash(kernel: Splash, placements, q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray,
               positions_bt: jnp.ndarray, pe: Positional, scale, xla_inter) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(out [B,T,N,H], lse [B,T,N]; 0 and -inf for padding) of DCA's placements (Intra, Successive,
  Inter) over q [B,T,N,H], k/v [B,T,K,H] before RoPE, left-padded rows at increasing positions.
  `scale(pos) -> factor` (or None) multiplies queries and keys before rotation. Where positions
  skip so that a row spans more chunks than T tokens can, the inter-chunk pairs take
  `xla_inter(q, k, v, positions) -> (out, lse)` (a `lax.cond`)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  intra, successive, inter = placements
  c, (b, t, _, h) = intra.chunk, q_btnh.shape
  pos_bt = positions_bt.astype(jnp.int32)
  real_bt = bw.sequence_index(pos_bt) >= 0
  xla_branch = functools.partial(xla_inter, q_btnh, k_btkh, v_btkh, positions_bt)
  if scale is not None:
    q_btnh = q_btnh * scale(pos_bt)[:, :, None, None].astype(q_btnh.dtype)
    k_btkh = k_btkh * scale(pos_bt)[:, :, None, None].astype(k_btkh.dtype)
  chunk_bt = jnp.where(real_bt, pos_bt // c, jnp.iinfo(jnp.int32).max)
  first_pos_b1 = jnp.min(jnp.where(real_bt, pos_bt, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
  first_b1 = first_pos_b1 // c
  # Whether a query's placement gives it some key: the chunk before holds a key; a chunk before that does.
  before_bt = jax.vmap(lambda row, at: jnp.searchsorted(row, at, side="right"))  # (keys of chunk <= at, per row)
  sorted_bt = jnp.sort(chunk_bt, axis=1)
  sees = [real_bt, real_bt & (before_bt(sorted_bt, chunk_bt - 1) > before_bt(sorted_bt, chunk_bt - 2)),
          real_bt & (first_b1 <= chunk_bt - 2)]

  def call(placement, q_bl, k_bl, v_bl, pos_bl, mask, ids, block=None):
    q_rot = pe.rotate(q_bl, placement.query_offsets(pos_bl, None)[:, :, None]) * h**-0.5
    k_rot = pe.rotate(k_bl, placement.key_offsets(pos_bl, None)[:, :, None])
    return kernel.masked(q_rot.astype(q_btnh.dtype), k_rot.astype(k_btkh.dtype), v_bl, mask, ids, pe.softcap, block)

  # Intra and successive: the row rolled, causal, segment ids its chunks.
  pads_b, length = jnp.sum(~real_bt, axis=1), -(-t // ALIGN) * ALIGN
  roll = lambda x: bw.pad_axis(bw.roll_padding(x, pads_b), 1, 0, length - t)  # noqa: E731
  unroll = lambda x: bw.roll_padding(x[:, :t], -pads_b)  # noqa: E731
  real_bl, chunk_bl = roll(real_bt), roll(chunk_bt)
  branches = []
  for lag, placement in enumerate((intra, successive)):
    ids = (jnp.where(real_bl, chunk_bl - lag, PAD_Q), jnp.where(real_bl, chunk_bl, PAD_KV))
    o_blnh, lse_bln = call(placement, roll(q_btnh), roll(k_btkh), roll(v_btkh), roll(pos_bt),
                           masks.CausalMask((length, length)), ids)
    branches.append((unroll(o_blnh), unroll(lse_bln)))
  # Inter: segments of `width` columns, one per chunk, if T tokens can span three chunks and the rows fit.
  segments = -(-t // c) + 1 if t > c else 2
  spans = jnp.max(jnp.where(real_bt, chunk_bt - first_b1, 0)) + 1  # (chunks the longest row spans)

  def kernel_branch():
    if t <= c:  # (no pairs: no call)
      return jnp.zeros_like(q_btnh), jnp.full((b, t, q_btnh.shape[2]), -jnp.inf)
    width = -(-c // ALIGN) * ALIGN
    seg_bt = jnp.where(real_bt, chunk_bt - first_b1, segments)  # (padding: out of range, dropped)
    col_bt = seg_bt * width + pos_bt % c - jnp.where(seg_bt == 0, first_pos_b1 % c, 0)
    rows_b1, x = jnp.arange(b)[:, None], segments * width

    def layout(a_bt: jnp.ndarray, fill=0) -> jnp.ndarray:  # [B, T, ...] -> [B, X, ...]
      return jnp.full((b, x) + a_bt.shape[2:], fill, a_bt.dtype).at[rows_b1, col_bt].set(a_bt, mode="drop")

    ids_bx = layout(jnp.zeros_like(pos_bt), fill=1)
    o_bxnh, lse_bxn = call(inter, layout(q_btnh), layout(k_btkh), layout(v_btkh), layout(pos_bt),
                           _segment_mask_class()((x, x), width), (ids_bx, ids_bx),
                           next(s for s in (512, 256, 128) if width % s == 0))
    at_bt = jnp.minimum(col_bt, x - 1)
    return (jnp.take_along_axis(o_bxnh, at_bt[:, :, None, None], axis=1).astype(q_btnh.dtype),
            jnp.take_along_axis(lse_bxn, at_bt[:, :, None], axis=1))

  branches.append(jax.lax.cond(spans <= segments, kernel_branch, xla_branch))
  o_btnh, lse_btn = None, None
  for (o, lse), sees_bt in zip(branches, sees):
    o, lse = jnp.where(sees_bt[:, :, None, None], o, 0), jnp.where(sees_bt[:, :, None], lse, -jnp.inf)
    o_btnh, lse_btn = (o, lse) if o_btnh is None else merge(o_btnh, lse_btn, o, lse, jnp.float32)
  return o_btnh.astype(q_btnh.dtype), lse_btn
