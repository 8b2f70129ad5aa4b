"""The attention-method interface: everything that differs between methods, defined once.

A method is one frozen dataclass that subclasses `AttentionMethod`: its fields are its options
(declared with `option`, which carries the default, the help text and the bounds the command line
uses), and its methods are its math. It is a static pytree, so it passes to `jax.jit` as a plain
static argument. Only `attend` is required:

    attend(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], positions [B,T], pe, layer) -> o [B,T,N,H]

q and k are projections before RoPE; positions are negative for left padding; `pe` is the
model's positional scheme (lminf_jax.positional: `Rotary` or `ALiBi`, and a logit soft-cap): a
method rotates query and key tiles by small offsets (`blockwise.query_tile`, `key_tile`) and
gets logits from `blockwise.scores`, which adds ALiBi's bias and caps, so one method serves
both; `layer` is the layer index (a traced scalar inside the layer scan). With only `attend`, a method
runs every one-shot path (forward, token_nll, ppl, finetune). To run through a fixed-size cache
(prefill, decode, generate, stream_nll, cached_token_nll) it also defines `cache_layout` and
`attend_chunk`; `attend_token`, `capacity`, `ring_entries`, `init_extra` and `write_extra` have
defaults. A blockwise method also subclasses `Tiling`, where its chunk, key_block and kernel
options are declared once. The cache (lminf_jax.cache) stores, per layer, `slots` starting tokens
forever and a ring of the latest `ring` tokens, plus any arrays of the method's own (`init_extra`),
and hands a layer's part to the method as a `CachedLayer`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import typing
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lminf_jax.attention.blockwise import Keys
from lminf_jax.attention.kernels import KERNEL_HELP, KERNELS
from lminf_jax.errors import UserError
from lminf_jax.positional import Positional
from lminf_jax.util.limits import INT32_MAX


def option(default, help: str, minimum: int | None = None, model_default: bool = False,
           choices: tuple[str, ...] | None = None, per_method: bool = False):
  """A method option: a dataclass field with its help text (the CLI's flag help), the least value
  an integer may take, whether None means "filled from the model by `resolve`", the values a
  string may take, and whether a built-in's option has a command-line flag of its own,
  `--<method>-<name>` (it means something else in each method: lambda's and infllm's top_k),
  instead of the `--<name>` every built-in with the option shares."""
  return dataclasses.field(default=default, metadata=dict(help=help, minimum=minimum, model_default=model_default,
                                                          choices=choices, per_method=per_method))


class CacheLayout(NamedTuple):
  """The storage a method's cache has per layer: `slots` starting tokens (P) kept for good, and a
  ring of the latest `ring` tokens (W)."""

  slots: int
  ring: int


class CachedLayer(NamedTuple):
  """One layer's cache as a method reads it, before the chunk's own keys are stored. (In
  `write_extra`, every layer's: key and value arrays have a leading L axis.)"""

  slots: Keys  # [B, K, P, H] the first P tokens, raw, at their positions; idx -1 while empty
  ring: Keys  # [B, K, W, H] the latest W tokens as `ring_entries` stored them; ring slot idx % W
  extra: Any  # the method's own per-layer arrays (`init_extra`)
  shared: Any  # the method's own arrays shared by every layer
  next_idx_b: jnp.ndarray  # [B] the sequence index of the row's next real token
  # Arrays of `extra` in host memory (memory kind pinned_host) are not sliced by layer: they keep
  # their leading L axis, and `layer_at` is this layer's index along it.
  layer_at: Any = 0

  def slots_with(self, new: Keys) -> Keys:
    """The slots with the chunk's own starting tokens (idx < P) written in: a chunk's first
    tokens of a sequence are starting keys of its later queries."""
    n_slots = self.slots.idx_bl.shape[1]
    return self.slots.put(jnp.where((new.idx_bl >= 0) & (new.idx_bl < n_slots), new.idx_bl, n_slots), new)

  def ring_order(self) -> jnp.ndarray:
    """[B, W]: ring slot (next_idx + w) % W holds the w-th oldest token."""
    ring_len = self.ring.idx_bl.shape[1]
    return (self.next_idx_b[:, None] + jnp.arange(ring_len, dtype=jnp.int32)) % ring_len

  def ordered_ring(self) -> Keys:
    """The ring oldest first [B, K, W, H]."""
    return self.ring.take(self.ring_order())


@functools.cache
def int_options(cls: type) -> tuple[dataclasses.Field, ...]:
  """The fields of a method class typed int or int | None (their values are checked)."""
  hints = typing.get_type_hints(cls)
  return tuple(f for f in dataclasses.fields(cls) if hints.get(f.name) in (int, int | None))


class AttentionMethod(abc.ABC):
  """Base class of attention methods (subclass it with `@dataclasses.dataclass(frozen=True)`).
  A blockwise method also subclasses `Tiling` (its chunk, key_block and kernel options)."""

  # Whether `attend` works with T split over the mesh's `sequence` axis.
  sequence_parallel: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_static(cls)

  def __post_init__(self):
    for field in int_options(type(self)):
      value, minimum = getattr(self, field.name), field.metadata.get("minimum")
      if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
          raise UserError(f"{self.name}.{field.name} must be an integer, got {value!r}")
        if minimum is not None and not minimum <= value <= INT32_MAX:
          raise UserError(f"{self.name}.{field.name} must be in [{minimum}, {INT32_MAX}], got {value}")
    for field in dataclasses.fields(self):
      choices = field.metadata.get("choices")
      if choices and getattr(self, field.name) not in choices:
        raise UserError(f"{self.name}.{field.name} must be one of {', '.join(choices)}, got {getattr(self, field.name)!r}")

  @property
  def name(self) -> str:
    return type(self).__name__

  # --- the spec -------------------------------------------------------------------------------
  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> AttentionMethod:
    """This spec with the model's defaults filled in (options declared `model_default`)."""
    return self

  def tiling(self) -> Tiling | None:
    """The method's chunk, key_block and kernel, which the paths around it tile by (a model's
    sliding-window layers, memory planning); None: it has none (they take `Tiling`'s defaults)."""
    return None

  @property
  def resolved(self) -> bool:
    return all(getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.metadata.get("model_default"))

  # --- one-shot ---------------------------------------------------------------------------------
  @abc.abstractmethod
  def attend(self, q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
             pe: Positional, layer: jnp.ndarray | int) -> jnp.ndarray:
    """The one-shot attention [B,T,N,H] (required: a class without it cannot be instantiated)."""

  def window_tokens(self) -> int:
    """The keys besides its own that one query chunk attends at most, for memory planning (0: not bounded)."""
    return 0

  # --- through a cache --------------------------------------------------------------------------
  def cache_layout(self, max_len: int | None) -> CacheLayout:
    """The cache for up to `max_len` tokens (None: as many as the method takes)."""
    raise UserError(f"{self.name} has no cached attention (it defines attend only, not cache_layout and "
                    f"attend_chunk), so it cannot run through a cache: use one-shot paths (nll, ppl, finetune)")

  def memory_hint(self) -> str:
    """What `check_memory` adds to its error when the method's cache does not fit the device ("": nothing)."""
    return ""

  def capacity(self, ring_len: int, extra) -> int | None:
    """Real tokens a row holds before its cache must refuse more; None: any number. By default
    the ring must not wrap."""
    return ring_len

  def cache_full(self, need: int, room: int, extra) -> str:
    """The one-line error for a call that needs `need` tokens of a cache whose rows hold `room`."""
    return f"{self.name.lower()} cache full: it holds {room} tokens, but this call needs {need} (init_cache's max_len)"

  def attend_chunk(self, q_bcnh: jnp.ndarray, new: Keys, cached: CachedLayer, pe: Positional,
                   layer: jnp.ndarray | int) -> tuple[jnp.ndarray, Any]:
    """A chunk's queries q [B,C,N,H] over the cache and the chunk's own raw keys `new` [B,K,C,H]
    (positions, sequence indices [B,C]; idx -1: padding): (out [B,C,N,H], what `write_extra`
    receives for this layer, or None)."""
    self.cache_layout(None)  # (refuses with the message above)
    raise UserError(f"{self.name} defines cache_layout but not attend_chunk: it cannot run through a cache")

  def attend_token(self, q_b1nh: jnp.ndarray, new: Keys, cached: CachedLayer, pe: Positional,
                   layer: jnp.ndarray | int) -> tuple[jnp.ndarray, Any]:
    """`attend_chunk` for one token per row (a decode step)."""
    return self.attend_chunk(q_b1nh, new, cached, pe, layer)

  def ring_entries(self, k_lbckh: jnp.ndarray, positions_bc: jnp.ndarray, ring_len: int,
                   pe: Positional) -> tuple[jnp.ndarray, jnp.ndarray]:
    """What the ring stores for a chunk's raw keys [L, B, C, K, H]: (keys, their ring positions
    [B, C]). By default the raw keys at their positions."""
    return k_lbckh, positions_bc

  def init_extra(self, config, batch: int, layout: CacheLayout, max_len: int | None) -> tuple[Any, Any]:
    """(per-layer arrays, every leaf with a leading L axis; arrays shared by the layers) of the
    method's own, for a cache of `batch` rows. `config` has num_layers, num_heads, num_kv_heads,
    head_dim and dtype."""
    return (), ()

  def write_extra(self, cached: CachedLayer, new: Keys, aux, next_idx_b: jnp.ndarray, ring_at_bc: jnp.ndarray,
                  pe: Positional) -> tuple[Any, Any]:
    """(extra, shared) after a chunk: `cached` is every layer's cache before it, `new` the chunk's
    raw keys and values [L, B, C, K, H] with positions and indices [B, C], `aux` what every
    layer's `attend_chunk` returned (leading L axis), `ring_at_bc` the ring slot each token goes
    to (W: not stored). Runs before the ring is overwritten."""
    return cached.extra, cached.shared

  def prefill_one_shot(self, dtype) -> bool:
    """Whether a prompt fed to an empty cache is attended one-shot (`attend`) and stored at once
    rather than chunk by chunk (equal results): where `attend` is the faster path (a flash
    kernel). A method whose `write_extra` needs `attend_chunk`'s aux must say False."""
    return False

  def feed_chunk(self, requested: int | None) -> int:
    """The chunk length to feed a prompt through the cache: `requested` (default: the method's
    `chunk` (`Tiling`), or 512). A method whose result depends on it returns its own."""
    return requested or FEED_CHUNK


FEED_CHUNK = 512  # tokens fed through a cache at a time by a method without a `chunk`

N_LOCAL_HELP = "local window: keys at distance < n_local (default: the model's training length)"
CHUNK_HELP = "query chunk length of the blockwise attention (a memory and speed knob)"
KEY_BLOCK_HELP = "key block length of the blockwise attention (a memory and speed knob)"


class Tiling(AttentionMethod):
  """A blockwise method: its `chunk` (queries per step), `key_block` (keys per step) and `kernel`
  (lminf_jax.attention.kernels) options, declared here once. A subclass gets them after its own
  options; one it annotates bare (`chunk: int`) stays where it is annotated, with the default here."""

  chunk: int
  key_block: int
  kernel: str

  @staticmethod
  def _options() -> dict[str, tuple[type, dataclasses.Field]]:
    """name -> (type, a fresh option field): a dataclass needs a field object of its own."""
    return {"chunk": (int, option(512, CHUNK_HELP, minimum=1)),
            "key_block": (int, option(512, KEY_BLOCK_HELP, minimum=1)),
            "kernel": (str, option("auto", KERNEL_HELP, choices=KERNELS))}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", {})}
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for name, (kind, field) in cls._options().items():
      if name in inherited:  # (a dataclass base has it, where it declared it)
        continue
      annotations.setdefault(name, kind)
      if name not in cls.__dict__:
        setattr(cls, name, field)
    cls.__annotations__ = annotations

  def tiling(self) -> Tiling:
    return self

  def feed_chunk(self, requested: int | None) -> int:
    return requested or self.chunk
