"""`BandMethod`: the attention-method interface of every method that is a `Band` (starting tokens
plus a window; dense, lambda, streaming). One-shot, sequence-parallel, cached and decode
attention all follow from the spec's `band()`."""

from __future__ import annotations

import abc
import functools

import jax.numpy as jnp

from lminf_jax.attention import ring
from lminf_jax.attention.banded import Band, attend_one, band_attention, sink_and_band
from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.kernels import flash_kernel, kernel_sink_and_band, on_mesh, xla_gradient
from lminf_jax.attention.method import AttentionMethod, CachedLayer, CacheLayout
from lminf_jax.attention.sequence_parallel import sequence_parallel_band
from lminf_jax.sharding import mesh_axis_size


class BandMethod(AttentionMethod):
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
    kernel = flash_kernel(self.kernel, q_btnh.dtype, pe)
    if kernel is None:
      return self.xla_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)
    fast = functools.partial(kernel_sink_and_band, self, kernel)
    return on_mesh(functools.partial(xla_gradient, fast, self.xla_attend), q_btnh, k_btkh, v_btkh, positions_bt,
                   pe)

  def xla_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) on one device through XLA: the kernel path's reference and gradient."""
    return sink_and_band(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.chunk, self.key_block, self.band())

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
