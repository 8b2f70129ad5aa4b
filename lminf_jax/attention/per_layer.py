"""`PerLayer`: a model whose layers differ (Gemma 2/3, Qwen2's max_window_layers): layers with their
own sliding window keep it, the others run the chosen method (docs/semantics.md#per-layer-windows). So `dense` is
the model as trained and `lambda` changes only its global layers.

Every layer shares one cache, laid out for the chosen method with a ring at least the window:
the windowed layers read its ring (anchored or raw keys, either is a valid `Keys`) through
`SlidingWindow` and no starting slots; what they hand the method's `write_extra` is zeros of its
shape. The layer picks its branch with `lax.cond` on a table indexed by the (traced) layer index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.dense import SlidingWindow
from lminf_jax.attention.method import AttentionMethod, CachedLayer, CacheLayout, Tiling
from lminf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PerLayer(AttentionMethod):
  """Layers l with windowed[l] attend their last `window` keys; the others run `method`."""

  method: AttentionMethod
  window: int
  windowed: tuple[bool, ...]

  @property
  def name(self) -> str:
    return self.method.name

  @property
  def sequence_parallel(self) -> bool:  # (SlidingWindow is sequence-parallel)
    return self.method.sequence_parallel

  def sliding(self) -> SlidingWindow:
    """The windowed layers' attention, tiled as the method is (or by `Tiling`'s defaults)."""
    tiling = self.method.tiling()
    if tiling is None:
      return SlidingWindow(window=self.window)
    return SlidingWindow(window=self.window, chunk=tiling.chunk, key_block=tiling.key_block, kernel=tiling.kernel)

  def tiling(self) -> Tiling | None:
    return self.method.tiling()

  def _windowed(self, layer) -> jnp.ndarray:
    return jnp.asarray(self.windowed)[layer]

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    args = (q_btnh, k_btkh, v_btkh, positions_bt, pe, layer)
    return jax.lax.cond(self._windowed(layer), lambda: self.sliding().attend(*args), lambda: self.method.attend(*args))

  def window_tokens(self) -> int:
    tokens = self.method.window_tokens()
    return tokens and max(tokens, self.window)

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    layout = self.method.cache_layout(max_len)
    need = min(self.window, max_len or self.window)
    if layout.ring >= need:
      return layout
    if not self.method.ring_may_grow:
      raise UserError(f"{self.name}'s cache ring ({layout.ring} tokens) is shorter than the model's sliding "
                      f"window ({self.window}) that its windowed layers read: give it a longer window (n_local)")
    return layout._replace(ring=need)

  def capacity(self, ring_len: int, extra) -> int | None:
    return self.method.capacity(ring_len, extra)

  def cache_full(self, need: int, room: int, extra) -> str:
    return self.method.cache_full(need, room, extra)

  def _cached(self, fn_name: str, q, new: Keys, cached: CachedLayer, pe, layer):
    method = getattr(self.method, fn_name)
    _, aux_shape = jax.eval_shape(lambda: method(q, new, cached, pe, layer))
    no_slots = cached._replace(slots=cached.slots.slice(0, 0))

    def windowed():
      out, _ = getattr(self.sliding(), fn_name)(q, new, no_slots, pe, layer)
      return out, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

    return jax.lax.cond(self._windowed(layer), windowed, lambda: method(q, new, cached, pe, layer))

  def attend_chunk(self, q_bcnh, new: Keys, cached: CachedLayer, pe, layer):
    return self._cached("attend_chunk", q_bcnh, new, cached, pe, layer)

  def attend_token(self, q_b1nh, new: Keys, cached: CachedLayer, pe, layer):
    return self._cached("attend_token", q_b1nh, new, cached, pe, layer)

  def ring_entries(self, k_lbckh, positions_bc, ring_len, pe):
    return self.method.ring_entries(k_lbckh, positions_bc, ring_len, pe)

  def init_extra(self, config, batch, layout, max_len):
    return self.method.init_extra(config, batch, layout, max_len)

  def write_extra(self, cached, new, aux, next_idx_b, ring_at_bc, pe):
    return self.method.write_extra(cached, new, aux, next_idx_b, ring_at_bc, pe)

  def prefill_one_shot(self, dtype) -> bool:
    return self.method.prefill_one_shot(dtype)

  def feed_chunk(self, requested: int | None) -> int:
    return self.method.feed_chunk(requested)
