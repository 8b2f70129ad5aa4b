"""`BandMethod`: the attention-method interface of every method that is a `Band` (starting tokens
plus a window; dense, lambda, streaming). One-shot, sequence-parallel, cached and decode
attention all follow from the spec's `band()`."""

from __future__ import annotations

import abc

import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention import ring
from lminf_jax.attention.banded import Band, add_starting_keys, attend_one, band_attention, sink_and_band, \
    starting_keys
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.kernels import FlashKernel, flash_band, flash_kernel, flash_or_xla, merge
from lminf_jax.attention.method import CachedLayer, CacheLayout, Tiling
from lminf_jax.attention.sequence_parallel import sequence_parallel_band
from lminf_jax.sharding import mesh_axis_size


class BandMethod(Tiling):
  """A method that is a `Band` (from its spec's `band()`): one-shot, sequence-parallel, cached and
  decode attention all follow from it. Its cache keeps the n_start first tokens and a ring of
  the window (or of `max_len` tokens, if fewer: then it refuses more)."""

  sequence_parallel = True

  @abc.abstractmethod
  def band(self) -> Band:
    """The method's starting tokens, window and rotation (from its resolved spec)."""

  def band_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(out [B,T,N,H], lse [B,T,N]): on one device, through the flash kernel the spec's `kernel`
    picks or XLA, or split over the mesh's `sequence` axis (XLA; then lse is None)."""
    if mesh_axis_size("sequence") > 1:
      return sequence_parallel_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.chunk, self.key_block,
                                    self.band()), None
    return flash_or_xla(self, q_btnh, k_btkh, v_btkh, positions_bt, pe)

  def xla_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) on one device through XLA: the kernel path's reference and gradient."""
    return sink_and_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.chunk, self.key_block, self.band())

  def kernel_attend(self, kernel: FlashKernel, q_btnh, k_btkh, v_btkh, positions_bt,
                    pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) on one device with the band through `kernel`, merged with the
    starting keys (XLA, in float32): q [B,T,N,H], k/v [B,T,K,H] before RoPE."""
    band = self.band()
    o_band, lse_band = flash_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, band.window, kernel)
    if not band.n_start:
      return o_band.astype(q_btnh.dtype), lse_band
    positions_bt = positions_bt.astype(jnp.int32)
    idx_bt = bw.sequence_index(positions_bt)
    keys = Keys(jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt, idx_bt)
    starts = starting_keys(keys, min(band.n_start, q_btnh.shape[1]))
    kv = k_btkh.shape[2]

    def starts_step(ci, q_bcnh, pos_bc, idx_bc):
      state = bw.init_state(bw.tile_rows(q_bcnh, kv))
      state = add_starting_keys(state, q_bcnh, pos_bc, idx_bc, pos_bc[:, -1:], starts, pe, band.window,
                                band.rotation)
      return bw.finish(state, q_bcnh.shape[1], jnp.float32)

    o_start, lse_start = bw.over_query_chunks(starts_step, q_btnh, positions_bt, idx_bt, self.chunk)
    return merge(o_band, lse_band, o_start, lse_start, q_btnh.dtype)

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    return self.band_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)[0]

  def prefill_one_shot(self, dtype) -> bool:
    return flash_kernel(self.kernel, dtype) is not None

  def window_tokens(self) -> int:
    return self.band().n_start + self.band().window

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    band = self.band()
    return CacheLayout(band.n_start, min(band.window, max_len or band.window))

  def capacity(self, ring_len: int, extra) -> int | None:
    return None if ring_len >= self.band().window else ring_len

  def ring_entries(self, k_lbckh, positions_bc, ring_len, pe):
    return ring.anchored(k_lbckh, positions_bc, ring_len, pe)

  def attend_chunk(self, q_bcnh, new: Keys, cached: CachedLayer, pe, layer):
    # (A ring shorter than the window holds every token: no key is ever farther than its length.)
    band = self.band()
    window = min(band.window, cached.ring.idx_bl.shape[1])
    return band_attention(q_bcnh, new.pos_bl, new.idx_bl, cached.ordered_ring().concat(new), cached.slots_with(new),
                          pe, self.chunk, self.key_block, window, band.rotation)[0], None

  def attend_token(self, q_b1nh, new: Keys, cached: CachedLayer, pe, layer):
    band = self.band()
    window = min(band.window, cached.ring.idx_bl.shape[1])
    return attend_one(q_b1nh, new, cached.slots, cached.ring, pe, window, band.rotation), None
