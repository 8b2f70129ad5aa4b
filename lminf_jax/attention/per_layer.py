"""`PerLayer`: a model whose layers differ (Gemma 2/3, Qwen2's max_window_layers): layers with their
own sliding window keep it, the others run the chosen method (docs/semantics.md#per-layer-windows). So `dense` is
the model as trained and `lambda` changes only its global layers.

Each kind of layer keeps a cache of its own (lminf_jax.cache): the global layers one laid out for
the method (its slots, ring and arrays), the windowed layers a ring of the sliding window alone
(`SlidingWindow`'s: no starting slots, no arrays of the method), each stacking only its layers.
A layer picks its branch with `lax.cond` on a table indexed by the (traced) layer index, and
reads its kind's cache at its place there (`stack_index`); a windowed layer hands the method's
`write_extra` zeros of its shape, which the write drops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.dense import SlidingWindow
from lminf_jax.attention.method import AttentionMethod, CachedLayer, Tiling


@dataclasses.dataclass(frozen=True)
class PerLayer(AttentionMethod):
  """Layers l with windowed[l] attend their last `window` keys; the others run `method`. Both
  kinds have layers (`LlamaConfig.resolve_attention` makes no PerLayer otherwise)."""

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

  def layers(self, windowed: bool) -> tuple[int, ...]:
    """The layers of one kind, in order (layer layers(w)[i] is entry i of its kind's cache)."""
    return tuple(layer for layer, w in enumerate(self.windowed) if w == windowed)

  def kind(self, layer: int) -> AttentionMethod:
    """The attention of layer `layer` (a static index): `sliding()` or the method."""
    return self.sliding() if self.windowed[layer] else self.method

  def stack_index(self, layer) -> jnp.ndarray:
    """The (traced) layer's entry in its kind's cache."""
    return jnp.asarray([self.layers(w).index(layer) for layer, w in enumerate(self.windowed)], jnp.int32)[layer]

  def _windowed(self, layer) -> jnp.ndarray:
    return jnp.asarray(self.windowed)[layer]

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    args = (q_btnh, k_btkh, v_btkh, positions_bt, pe, layer)
    return jax.lax.cond(self._windowed(layer), lambda: self.sliding().attend(*args), lambda: self.method.attend(*args))

  def window_tokens(self) -> int:
    tokens = self.method.window_tokens()
    return tokens and max(tokens, self.window)

  def cache_full(self, need: int, room: int, extra) -> str:
    return self.method.cache_full(need, room, extra)

  def memory_hint(self) -> str:
    return self.method.memory_hint()

  def attend_kinds(self, q_bcnh, new: Keys, global_layer: Callable[[], CachedLayer],
                   windowed_layer: Callable[[], CachedLayer], pe, layer) -> tuple[jnp.ndarray, object]:
    """Cached attention of a chunk q [B, C, N, H] (C = 1: `attend_token`) in layer `layer`
    (traced), by its kind, over what its kind's cache holds of it (`global_layer()` or
    `windowed_layer()`, read only in the branch taken): (out [B, C, N, H], the method's aux for
    `write_extra`; zeros of its shape on a windowed layer)."""
    fn_name = "attend_token" if q_bcnh.shape[1] == 1 else "attend_chunk"
    method = lambda: getattr(self.method, fn_name)(q_bcnh, new, global_layer(), pe, layer)  # noqa: E731
    _, aux_shape = jax.eval_shape(method)

    def windowed():
      out, _ = getattr(self.sliding(), fn_name)(q_bcnh, new, windowed_layer(), pe, layer)
      return out, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

    return jax.lax.cond(self._windowed(layer), windowed, method)

  def prefill_one_shot(self, dtype) -> bool:
    return self.method.prefill_one_shot(dtype)

  def feed_chunk(self, requested: int | None) -> int:
    return self.method.feed_chunk(requested)
