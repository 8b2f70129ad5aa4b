"""Fixed-size KV caches: starting-token slots plus a ring buffer, as pytrees of static shape.

The attention method decides the layout (`cache_layout`: P slots and a ring of W, plus arrays
of its own) and the math (lminf_jax.attention); this module only stores. `lambda` keeps n_global
slots and an n_local ring, `streaming` n_sink slots and an n_recent ring; `dense` is a ring of a
chosen maximum length with no slots (feeding more tokens than it holds is an error). Given a
maximum length below the window, a lambda or streaming ring is that long (a decode step reads
only those slots) and, like dense, refuses more. Cache memory never grows. Refusing is
`check_room`'s one-line error, or, under a caller's jit, where it cannot look at the cache, NaN
outputs from then on for each row that overflowed (`capacity`, `attend_cached`).

Slots hold raw keys with their positions; the ring holds what the method's `ring_entries` makes
of them (banded methods: keys rotated from an anchor, lminf_jax.attention.ring). Layers only read
the cache; `write` stores a chunk's keys for all layers at once, in place.

A model with windowed and global layers (`PerLayer`) keeps one cache per kind: the global layers'
laid out for the method, and in `Cache.windowed` the windowed layers' own, a ring of the sliding
window (at most max_len), whatever the method and max_len. The layer scan then reads each layer's
kv by its index in its kind's stack (`attend_cached`), and `write` stores each kind's layers in its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import math

import numpy as np

from lminf_jax.attention.blockwise import Keys, after, scatter_layers
from lminf_jax.attention.method import AttentionMethod, CachedLayer, CacheLayout
from lminf_jax.attention.per_layer import PerLayer
from lminf_jax.errors import UserError
from lminf_jax.sharding import constrain, mesh_axis_size, on_host
from lminf_jax.util.limits import INT32_MAX, THIS_MACHINE, check_fits, device_memory, host_memory_bytes


class LayerKV(NamedTuple):
  """One layer's keys and values; the cache stacks L of them (leading axis) for the layer scan."""

  slot_k: jnp.ndarray  # [B, K, P, H] starting tokens, before RoPE
  slot_v: jnp.ndarray
  ring_k: jnp.ndarray  # [B, K, W, H] the latest W tokens at slot idx % W, as the method's ring_entries stores them
  ring_v: jnp.ndarray
  extra: Any  # the method's own arrays (`init_extra`)


class Cache(NamedTuple):
  kv: LayerKV  # every leaf with a leading L axis (with `windowed`: the global layers' alone)
  slot_pos: jnp.ndarray  # [B, P] positions of the starting tokens (shared by all layers)
  slot_idx: jnp.ndarray  # [B, P] their sequence indices, -1 while empty
  ring_pos: jnp.ndarray  # [B, W] the ring positions the method's ring_entries gave its keys
  ring_idx: jnp.ndarray  # [B, W] their sequence indices, -1 while empty
  next_idx: jnp.ndarray  # [B] sequence index of the next real token
  shared: Any  # the method's own arrays shared by the layers
  # `PerLayer`: the windowed layers' own cache (kv [L_w, ...], a ring of the window, no slots, no
  # arrays of the method's; next_idx the same); None: every layer is in kv.
  windowed: Cache | None = None

  def layer(self, kv: LayerKV, at=0) -> CachedLayer:
    """What a method reads of layer `kv` (or of every layer, given the stacked kv); `at`: the
    layer's index along the L axis of the host-memory arrays, which stay whole (`split_host`)."""
    host = [x for x in jax.tree.leaves(kv.extra) if on_host(x)]
    return CachedLayer(Keys(kv.slot_k, kv.slot_v, self.slot_pos, self.slot_idx),
                       Keys(kv.ring_k, kv.ring_v, self.ring_pos, self.ring_idx), kv.extra, self.shared, self.next_idx,
                       at if host and host[0].shape[0] > 1 else 0)  # (one layer's own: the decode loop's)


def split_host(kv: LayerKV) -> tuple[LayerKV, LayerKV]:
  """(kv without its host-memory arrays, those alone), each None where the other has an array:
  the layer scan slices the first along L and passes the second whole, so that a layer reads
  only what it needs of a host array (one block: a slice of a layer would be copied)."""
  return (jax.tree.map(lambda x: None if on_host(x) else x, kv), jax.tree.map(lambda x: x if on_host(x) else None, kv))


def merge_host(kv: LayerKV, host: LayerKV | None) -> LayerKV:
  """`split_host`'s inverse (host None: kv as it is)."""
  if host is None:
    return kv
  return jax.tree.map(lambda x, h: h if x is None else x, kv, host, is_leaf=lambda x: x is None)


class CachedInput(NamedTuple):
  """A layer's input from the cache: its kv (scanned over layers), the rest of the cache (of kv,
  only the arrays in host memory, whole: `split_host`) and the chunk's sequence indices idx [B, T]
  (both broadcast to every layer). With a cache per layer kind (`Cache.windowed`): no kv, and the
  whole cache, which the layer reads at its index."""

  kv: LayerKV | None
  cache: Cache | None
  idx_bt: jnp.ndarray | None


def init_cache(config, spec: AttentionMethod, batch: int, max_len: int | None = None) -> Cache:
  """An empty cache for `batch` rows under the attention `spec`, for up to `max_len` tokens
  (required by dense and infllm; a lambda or streaming cache without it takes any number)."""
  spec = config.resolve_attention(spec)
  if mesh_axis_size("sequence") > 1:
    raise UserError("a cache runs on data, fsdp and tensor mesh axes, not sequence-parallel: drop the sequence axis")
  if not isinstance(spec, PerLayer):
    layout = spec.cache_layout(max_len)
    make = lambda: placed(_empty(config, spec, layout, batch, max_len))  # noqa: E731
  else:  # a cache per layer kind, each stacking its layers alone
    kinds = [(config.replace(num_layers=len(spec.layers(w)), window_layers=()), kind, kind.cache_layout(max_len))
             for w, kind in ((False, spec.method), (True, spec.sliding()))]
    make = lambda: placed(_empty(*kinds[0], batch, max_len)._replace(  # noqa: E731
        windowed=_empty(*kinds[1], batch, max_len)))

  # Made inside jit: under a mesh each device allocates only its shard, and arrays a method keeps
  # in host memory are made there, never whole on the device.
  return jax.jit(make)()


def _empty(config, spec: AttentionMethod, layout: CacheLayout, batch: int, max_len: int | None) -> Cache:
  """An empty cache of `layout` for config.num_layers layers under `spec`."""
  extra, shared = spec.init_extra(config, batch, layout, max_len)
  kv = lambda length: jnp.zeros((config.num_layers, batch, config.num_kv_heads, length, config.head_dim),  # noqa: E731
                                jnp.dtype(config.dtype))
  index = lambda length, fill: jnp.full((batch, length), fill, jnp.int32)  # noqa: E731
  return Cache(LayerKV(kv(layout.slots), kv(layout.slots), kv(layout.ring), kv(layout.ring), extra),
               index(layout.slots, 0), index(layout.slots, -1), index(layout.ring, 0), index(layout.ring, -1),
               jnp.zeros((batch,), jnp.int32), shared)


_KV_AXES = ("layers", "cache_batch", "cache_heads", "cache_length", "cache_head_dim")


def placed(cache: Cache) -> Cache:
  """`cache` under its logical axes on the current mesh (nothing without one): keys and values
  [L, B, K, S, H] over batch and kv heads, positions and indices [B, S] over batch; a method's own
  arrays by their leading axes, if they name them (a `logical_axes()` of the same structure),
  else over batch (their axis 1 per layer, axis 0 shared); the windowed layers' cache alike. A
  length is never split."""
  leading = lambda *axes: lambda x: constrain(x, *axes, *(None,) * (x.ndim - len(axes)))  # noqa: E731
  extra = cache.kv.extra
  extra_axes = (extra.logical_axes() if hasattr(extra, "logical_axes")
                else jax.tree.map(lambda _: ("layers", "cache_batch"), extra))
  kv = cache.kv._replace(**{name: constrain(getattr(cache.kv, name), *_KV_AXES)
                            for name in ("slot_k", "slot_v", "ring_k", "ring_v")},
                         extra=jax.tree.map(lambda x, axes: leading(*axes)(x), extra, extra_axes))
  index = {name: constrain(getattr(cache, name), "cache_batch", "cache_length")
           for name in ("slot_pos", "slot_idx", "ring_pos", "ring_idx")}
  return cache._replace(kv=kv, **index, next_idx=constrain(cache.next_idx, "cache_batch"),
                        shared=jax.tree.map(leading("cache_batch"), cache.shared),
                        windowed=None if cache.windowed is None else placed(cache.windowed))


class CacheBytes(NamedTuple):
  """A cache's bytes in device memory and in host memory (per device under a mesh)."""

  device: int
  host: int


def cache_bytes(config, attention, max_len: int | None, batch: int = 1) -> CacheBytes:
  """The bytes of an empty cache (`init_cache`) by the memory its arrays live in, from shapes
  alone: traced without a mesh, compiled under one (each device's shards); nothing allocated."""
  make = jax.jit(lambda: init_cache(config, attention, batch, max_len=max_len))
  if jax.sharding.get_abstract_mesh().empty:
    avals = jax.tree.leaves(make.trace().out_avals)
    sizes = [(math.prod(a.shape) * a.dtype.itemsize, a.memory_space == jax.memory.Space.Host) for a in avals]
  else:
    lowered = make.lower()
    shardings = jax.tree.leaves(lowered.compile().output_shardings)
    sizes = [(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, s.memory_kind == "pinned_host")
             for a, s in zip(jax.tree.leaves(lowered.out_info), shardings)]
  return CacheBytes(sum(n for n, host in sizes if not host), sum(n for n, host in sizes if host))


def check_memory(config, attention, max_len: int | None = None, batch: int = 1) -> None:
  """Refuses, from sizes alone (nothing allocated), what would not fit in memory: one layer's
  keys and values over the attention's window on the device (banded attention pads a chunk's
  keys to it, however few tokens there are), and a cache for `max_len` tokens, if given (refused,
  too, beyond int32 positions): its device arrays in the device's memory, the arrays a method keeps
  in host memory (infllm's offloaded blocks) in this machine's, with the device arrays where the
  device is this machine's CPU."""
  spec = config.resolve_attention(attention)
  name, memory = spec.name.lower(), device_memory()
  a_name = ("an " if name[0] in "aeiou" else "a ") + name
  if window := spec.window_tokens():
    per_token = 2 * batch * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    chunk = 0 if spec.tiling() is None else spec.tiling().chunk  # (the chunk's own keys)
    check_fits(f"{name} attention over a window of {window} tokens", (window + chunk) * per_token, memory)
  if max_len is None:
    return
  if max_len > INT32_MAX:
    raise UserError(f"{max_len} tokens are more than int32 positions hold (at most {INT32_MAX})")
  on_mesh = not jax.sharding.get_abstract_mesh().empty
  nbytes = cache_bytes(config, spec, max_len, batch)
  try:
    check_fits(f"{a_name} cache for {max_len} tokens" + (" per device" if on_mesh else ""), nbytes.device, memory)
  except UserError as e:
    raise UserError(f"{e}{spec.memory_hint()}") from None
  if nbytes.host:
    devices = jax.local_device_count() if on_mesh else 1
    host = (nbytes.host + (nbytes.device if memory[0] == THIS_MACHINE else 0)) * devices
    check_fits(f"the host memory of {a_name} cache for {max_len} tokens", host, (THIS_MACHINE, host_memory_bytes()))


def capacity(spec: AttentionMethod, cache: Cache, kv: LayerKV | None) -> int | None:
  """Real tokens a row of the cache holds before it must refuse more (None: any number): with a
  cache per layer kind, the fewer of its kinds' (kv unused)."""
  if cache.windowed is None:
    return spec.capacity(cache.ring_idx.shape[1], kv.extra)
  rooms = (capacity(spec.method, cache._replace(windowed=None), cache.kv),
           capacity(spec.sliding(), cache.windowed, cache.windowed.kv))
  return min((room for room in rooms if room is not None), default=None)


def check_room(cache: Cache, spec: AttentionMethod, new_tokens_b) -> None:
  """Raises UserError if feeding `new_tokens_b` more real tokens per row overflows the cache's
  `capacity`. Traced (under a caller's jit) it cannot look: then the cached forward refuses
  itself, with NaN outputs for the rows that overflow (`attend_cached`)."""
  room = capacity(spec, cache, cache.kv)
  if room is None or any(isinstance(x, jax.core.Tracer) for x in (cache.next_idx, new_tokens_b)):
    return
  need = int(np.max(np.asarray(cache.next_idx) + np.asarray(new_tokens_b)))
  if need > room:
    raise UserError(spec.cache_full(need, room, cache.kv.extra))


def chunk_indices(next_idx_b: jnp.ndarray, positions_bc: jnp.ndarray) -> jnp.ndarray:
  """Sequence indices [B, C] of a chunk (negative positions = padding, idx -1)."""
  valid_bc = positions_bc >= 0
  idx_bc = next_idx_b[:, None] + jnp.cumsum(valid_bc, axis=1, dtype=jnp.int32) - 1
  return jnp.where(valid_bc, idx_bc, -1)


def attend_cached(q_bcnh, k_bckh, v_bckh, positions_bc, inputs: CachedInput, pe, spec: AttentionMethod,
                  layer) -> tuple[jnp.ndarray, Any]:
  """Attention [B, C, N, H] of a chunk over one layer's cache (not yet holding the chunk) and
  itself (the method's `attend_chunk`, or `attend_token` for C = 1), and what the method's
  `write_extra` takes from it. A row whose chunk overflows the cache's `capacity` (which
  `check_room` refuses before, unless traced) gets NaN, and so does every later chunk of it:
  `write` drops what does not fit."""
  new = Keys(jnp.swapaxes(k_bckh, 1, 2), jnp.swapaxes(v_bckh, 1, 2), positions_bc, inputs.idx_bt)
  if inputs.kv is None:  # (a cache per layer kind: the layer reads its kind's at its index)
    at = spec.stack_index(layer)
    index = lambda x: x if on_host(x) else jax.lax.dynamic_index_in_dim(x, at, keepdims=False)  # noqa: E731
    read = lambda cache: lambda: cache.layer(jax.tree.map(index, cache.kv), at)  # noqa: E731
    out_bcnh, aux = spec.attend_kinds(q_bcnh, new, read(inputs.cache), read(inputs.cache.windowed), pe, layer)
    kv = inputs.cache.kv
  else:
    attend = spec.attend_token if q_bcnh.shape[1] == 1 else spec.attend_chunk
    kv = merge_host(inputs.kv, inputs.cache.kv)
    out_bcnh, aux = attend(q_bcnh, new, inputs.cache.layer(kv, layer), pe, layer)
  room = capacity(spec, inputs.cache, kv)
  if room is not None:
    out_bcnh = jnp.where((jnp.max(inputs.idx_bt, axis=1) >= room)[:, None, None, None], jnp.nan, out_bcnh)
  return out_bcnh, aux


def write(cache: Cache, k_lbckh, v_lbckh, aux, positions_bc, idx_bc, pe, spec: AttentionMethod) -> Cache:
  """Stores a chunk's keys and values of every layer [L, B, C, K, H]: a token goes to slot idx
  (if idx < P) and to ring slot idx % W (only the chunk's last W tokens: no slot is written
  twice). Padding (idx -1) is dropped, and so is a token past the capacity of a ring that must
  not wrap (its row's outputs are NaN: `attend_cached`). The method's own arrays are updated
  first (`write_extra`, from `aux`: what every layer's attention returned), then the ring. A
  cache per layer kind stores each kind's layers in its own."""
  if cache.windowed is not None:
    return _write_kinds(cache, k_lbckh, v_lbckh, aux, positions_bc, idx_bc, pe, spec)
  ring_len = cache.ring_idx.shape[1]
  valid_bc = idx_bc >= 0
  new = Keys(k_lbckh, v_lbckh, positions_bc, idx_bc)
  next_idx = cache.next_idx + jnp.sum(valid_bc, axis=1, dtype=jnp.int32)
  last_b1 = jnp.max(idx_bc, axis=1, keepdims=True)
  keep_bc = valid_bc & (idx_bc > last_b1 - ring_len)
  if capacity(spec, cache, cache.kv) == ring_len:  # a ring that must not wrap (dense, short)
    keep_bc &= idx_bc < ring_len
  ring_at = jnp.where(keep_bc, idx_bc % ring_len, ring_len)
  extra, shared = spec.write_extra(cache.layer(cache.kv), new, aux, next_idx, ring_at, pe)
  # The ring writes wait for the method's updates, which may read the ring.
  k_lbckh, v_lbckh = after(k_lbckh, extra, shared), after(v_lbckh, extra, shared)
  n_slots = cache.slot_idx.shape[1]
  slots = _put(Keys(cache.kv.slot_k, cache.kv.slot_v, cache.slot_pos, cache.slot_idx),
               jnp.where(valid_bc & (idx_bc < n_slots), idx_bc, n_slots), new)
  ring_k, ring_pos = spec.ring_entries(k_lbckh, positions_bc, ring_len, pe)
  ring = _put(Keys(cache.kv.ring_k, cache.kv.ring_v, cache.ring_pos, cache.ring_idx), ring_at,
              Keys(ring_k, v_lbckh, ring_pos, idx_bc))
  return Cache(LayerKV(slots.k_bklh, slots.v_bklh, ring.k_bklh, ring.v_bklh, extra), slots.pos_bl, slots.idx_bl,
               ring.pos_bl, ring.idx_bl, next_idx, shared)


def _write_kinds(cache: Cache, k_lbckh, v_lbckh, aux, positions_bc, idx_bc, pe, spec: PerLayer) -> Cache:
  """`write` into a cache per layer kind: each kind's layers of the keys, values, aux and of the
  per-layer arrays of `pe` (those with the keys' L axis) gathered along L, into its own cache."""

  def kind(windowed: bool) -> Cache:
    layers = np.asarray(spec.layers(windowed), np.int32)
    take = lambda tree: jax.tree.map(lambda x: x[layers], tree)  # noqa: E731
    kind_pe = jax.tree.map(lambda x: x[layers] if x.ndim == k_lbckh.ndim else x, pe)
    own = cache.windowed if windowed else cache._replace(windowed=None)
    return write(own, take(k_lbckh), take(v_lbckh), None if windowed else take(aux), positions_bc, idx_bc, kind_pe,
                 spec.kind(layers[0]))

  return kind(False)._replace(windowed=kind(True))


def split_layers(cache: Cache, spec: AttentionMethod) -> tuple[Cache, ...]:
  """One cache per layer, of its kind (kv leaves with a leading axis of 1, sliced from the stacks;
  the index arrays copied, so that no two layers donate one buffer): for a loop over layers whose
  buffers are separate (`generation.decode`, `cached_layer`)."""
  def one(own: Cache, at: int) -> Cache:  # (a slice of the whole array would be the array itself: copied)
    kv = jax.tree.map(lambda x: jax.lax.slice_in_dim(x, at, at + 1) if x.shape[0] > 1 else jnp.copy(x), own.kv)
    return jax.tree.map(jnp.copy, own._replace(kv=None))._replace(kv=kv)

  if cache.windowed is None:
    return tuple(one(cache, layer) for layer in range(cache.kv.slot_k.shape[0]))
  return tuple(one(cache.windowed if w else cache._replace(windowed=None), spec.layers(w).index(layer))
               for layer, w in enumerate(spec.windowed))


def stack_layers(layer_caches: tuple[Cache, ...], spec: AttentionMethod) -> Cache:
  """`split_layers`' inverse: one cache (the index arrays of each kind's first layer)."""
  def stack(caches: list[Cache]) -> Cache:
    return caches[0]._replace(kv=jax.tree.map(lambda *xs: jnp.concatenate(xs), *(c.kv for c in caches)))

  if not isinstance(spec, PerLayer):
    return stack(list(layer_caches))
  kind = lambda w: stack([layer_caches[layer] for layer in spec.layers(w)])  # noqa: E731
  return kind(False)._replace(windowed=kind(True))


def _put(keys: Keys, at_bc: jnp.ndarray, new: Keys) -> Keys:
  """Writes token c of `new` (keys [L, B, C, K, H]) to slot at_bc[:, c] of every layer's `keys`
  [L, B, K, S, H] (out of range: dropped)."""
  b_b1 = jnp.arange(at_bc.shape[0])[:, None]
  return Keys(scatter_layers(keys.k_bklh, at_bc, new.k_bklh), scatter_layers(keys.v_bklh, at_bc, new.v_bklh),
              keys.pos_bl.at[b_b1, at_bc].set(new.pos_bl, mode="drop"),
              keys.idx_bl.at[b_b1, at_bc].set(new.idx_bl, mode="drop"))
