"""Self-Extend (Jin et al., 2024), the `SelfExtend` method: neighbour keys at their true distance,
the rest at a grouped distance, in one softmax (docs/semantics.md#selfextend).

Query i, key j <= i (RoPE positions): a neighbour (i - j < W) sits at distance i - j; any other key
at (i // G - j // G) + W - W // G. LongLM's eager patch (self_extend_patch/Llama.py:134) shifts by
the float W - W / G, which its authors called an accident and fixed to W - W // G in
Llama_4_40.py:131 (commit 715c1e3); this follows the fix, which keeps every position an integer.
The two agree when G divides W. `scale_base` (off by default, as LongLM's `scale_base=-1`) is
LongLM's log scaling of the queries (Llama.py:111-115): q x max(1, ln(p + 1) / ln(scale_base)).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lminf_jax.attention.kernels import FlashKernel, flash_band, flash_kernel, flash_or_xla, merge
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.method import CachedLayer, option
from lminf_jax.attention.remapped import RemappedMethod


@dataclasses.dataclass(frozen=True)
class Neighbours:
  """Keys at distance < window, at their true distance."""

  window: int

  def selects(self, pos_bc, idx_bc, pos_bs, idx_bs):
    return idx_bc[:, :, None] - idx_bs[:, None, :] < self.window

  def query_offsets(self, pos_bc, ref_b1):
    return pos_bc - ref_b1

  def key_offsets(self, pos_bs, ref_b1):
    return pos_bs - ref_b1


@dataclasses.dataclass(frozen=True)
class Grouped:
  """Keys at distance >= window, at (i // group - j // group) + window - window // group."""

  group: int
  window: int

  def selects(self, pos_bc, idx_bc, pos_bs, idx_bs):
    return idx_bc[:, :, None] - idx_bs[:, None, :] >= self.window

  def query_offsets(self, pos_bc, ref_b1):
    return pos_bc // self.group - ref_b1 // self.group + self.window - self.window // self.group

  def key_offsets(self, pos_bs, ref_b1):
    return pos_bs // self.group - ref_b1 // self.group


@dataclasses.dataclass(frozen=True)
class SelfExtend(RemappedMethod):
  """Self-Extend: keys within `window_size` at their true distance, the rest at grouped positions
  (floor division by `group_size`), one softmax. Its cache keeps every key. group_size=1 is dense."""

  group_size: int = option(8, "G: positions beyond the neighbour window are floor-divided by it", minimum=1)
  window_size: int | None = option(None, "W: neighbour window, keys at distance < W keep their true distance "
                                   "(default: a quarter of the training length)", minimum=1, model_default=True)
  scale_base: int | None = option(None, "LongLM's log scaling of queries, q x max(1, ln(p + 1) / ln(scale_base)) "
                                  "(default: off)", minimum=2)

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> SelfExtend:
    return dataclasses.replace(self, window_size=self.window_size or max(1, max_position_embeddings // 4))

  def placements(self):
    return Neighbours(self.window_size), Grouped(self.group_size, self.window_size)

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    return flash_or_xla(self, q_btnh, k_btkh, v_btkh, positions_bt, pe)[0]

  def attend_chunk(self, q_bcnh, new: Keys, cached: CachedLayer, pe, layer):
    return super().attend_chunk(self.scaled(q_bcnh, new.pos_bl), new, cached, pe, layer)

  def scaled(self, q_btnh: jnp.ndarray, positions_bt: jnp.ndarray) -> jnp.ndarray:
    """Queries [B,T,N,H] times LongLM's log scale of their positions [B,T] (unchanged without `scale_base`)."""
    if self.scale_base is None:
      return q_btnh
    log_p = jnp.log(jnp.maximum(positions_bt.astype(jnp.float32) + 1, 1.0))
    return q_btnh * jnp.maximum(log_p / jnp.log(float(self.scale_base)), 1.0)[:, :, None, None].astype(q_btnh.dtype)

  def prefill_one_shot(self, dtype) -> bool:
    return flash_kernel(self.kernel, dtype) is not None

  def xla_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) through XLA: the kernel path's reference and gradient."""
    return self.one_shot(self.scaled(q_btnh, positions_bt), k_btkh, v_btkh, positions_bt, pe)

  def kernel_attend(self, kernel: FlashKernel, q_btnh, k_btkh, v_btkh, positions_bt,
                    pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]): the neighbour band through `kernel`, merged with the grouped
    keys (XLA, which computes scores only for key blocks that hold some)."""
    q_btnh = self.scaled(q_btnh, positions_bt)
    o_band, lse_band = flash_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.window_size, kernel)
    o_far, lse_far = self.one_shot(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.placements()[1:])
    return merge(o_band, lse_band, o_far, lse_far, q_btnh.dtype)


__all__ = ["Grouped", "Neighbours", "SelfExtend"]

