"""jit-compiled generation through a fixed-size cache.

The prompt is fed in chunks (`lax.scan`), then the decode loop runs inside `lax.while_loop`:
no Python loop per token. Sampling is greedy (temperature 0), or temperature with optional
top-k and top-p, from an explicit PRNG key. A row stops at an EOS token, at a stop string
(checked on the host through an ordered `io_callback`, which also streams the tokens out), or
after `max_new_tokens`. Batches are left-padded; each row's output equals what it gives alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lminf_jax.attention import AttentionMethod, Dense
from lminf_jax.attention.blockwise import split_chunks
from lminf_jax.cache import Cache, check_room, init_cache, split_layers, stack_layers
from lminf_jax.errors import UserError
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import Llama, cached_layer


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k / top_p (nucleus) filter the distribution before sampling."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not 0 <= self.temperature < float("inf"):  # (also refuses NaN)
      raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k <= 0:
      raise UserError(f"top_k must be positive, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits_bv: jnp.ndarray, key: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
  """Next tokens [B] from float32 logits [B, V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / sampling.temperature
  if sampling.top_k is not None:
    kth_b1 = jax.lax.top_k(logits_bv, min(sampling.top_k, logits_bv.shape[-1]))[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  if sampling.top_p is not None:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep_bv = cumulative_bv - jax.nn.softmax(sorted_bv, axis=-1) < sampling.top_p
    cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def prefill(params: dict, config: LlamaConfig, cache: Cache, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray,
            attention: AttentionMethod, chunk: int) -> tuple[jnp.ndarray, Cache]:
  """Feeds a left-padded prompt through the cache (donated) `chunk` tokens at a time: (last
  logits [B, V], cache). T must be a multiple of `chunk` (pad on the left with position -1)."""
  attention = config.resolve_attention(attention)
  check_room(cache, attention, jnp.sum(jnp.asarray(positions_bt) >= 0, axis=1))
  return _prefill(params, config, cache, tokens_bt, positions_bt, attention, *_feed(cache, attention, config, chunk,
                                                                                     tokens_bt.shape[1]))


def _feed(cache: Cache, attention: AttentionMethod, config: LlamaConfig, chunk: int, length: int) -> tuple[int, bool]:
  """(chunk, one_shot): a prompt goes into an empty cache in one piece, attended one-shot, where
  the method says that is its faster path (`prefill_one_shot`: a flash kernel); else `chunk` at a time."""
  empty = not isinstance(cache.next_idx, jax.core.Tracer) and not np.any(np.asarray(cache.next_idx))
  return (length, True) if empty and attention.prefill_one_shot(config.dtype) else (chunk, False)


class DecodeState(NamedTuple):
  """The decode loop's carry."""

  step: jnp.ndarray  # [] tokens sampled so far
  layer_caches: tuple  # one Cache per layer (kv leaves with a leading axis of 1)
  logits_bv: jnp.ndarray  # [B, V] logits of the next token
  pos_b: jnp.ndarray  # [B] position of the next token
  key: jnp.ndarray  # PRNG key
  done_b: jnp.ndarray  # [B] the row has stopped
  tokens_bn: jnp.ndarray  # [B, max_new_tokens] sampled tokens
  lengths_b: jnp.ndarray  # [B] tokens of each row up to and including its stop


@dataclasses.dataclass(frozen=True)
class Decoded:
  """What `decode` returns. `cache` holds every sampled token (a row's tokens after its stop
  too, as the loop ran on for the other rows): `decode(..., d.cache, d.logits_bv, d.next_pos_b,
  ...)` continues the generation."""

  tokens_bn: jnp.ndarray  # [B, max_new_tokens]; after a row's length, undefined
  lengths_b: jnp.ndarray  # [B]
  logits_bv: jnp.ndarray  # [B, V] logits after the last sampled token
  next_pos_b: jnp.ndarray  # [B] position of the next token
  layer_caches: tuple  # the loop's per-layer caches
  attention: AttentionMethod  # the resolved spec (how the layer caches stack)

  @property
  def cache(self) -> Cache:
    """The updated cache, stacked from the per-layer ones when asked for (a copy of the cache:
    a generation that does not continue never pays for it)."""
    return _stack_layers(self.layer_caches, self.attention)


@functools.partial(jax.jit, static_argnames=("config", "attention", "chunk", "one_shot"), donate_argnames=("cache",))
def _prefill(params, config, cache, tokens_bt, positions_bt, attention, chunk, one_shot=False):
  model = Llama(config)

  def step(cache, xs):
    tokens_bc, positions_bc = xs
    x_bcd, cache = model.apply({"params": params}, tokens_bc, positions_bc, attention, cache, one_shot,
                               method=Llama.hidden)
    return cache, x_bcd[:, -1]

  cache, last_nbd = jax.lax.scan(step, cache, (split_chunks(tokens_bt, chunk), split_chunks(positions_bt, chunk)))
  return model.apply({"params": params}, last_nbd[-1][:, None], method=Llama.unembed)[:, 0], cache


def decode(params: dict, config: LlamaConfig, cache: Cache, logits_bv: jnp.ndarray, next_pos_b: jnp.ndarray,
           key: jnp.ndarray, attention: AttentionMethod, sampling: Sampling, max_new_tokens: int,
           eos_ids: tuple[int, ...], on_tokens: Callable | None = None) -> Decoded:
  """The decode loop (`lax.while_loop`) after logits [B, V] of the tokens before positions next_pos [B].

  `on_tokens(step, tokens [B]) -> stop [B] bool` runs on the host after every step (streaming,
  stop strings); tokens after a row's end are undefined.

  The cache is consumed (its buffers are freed), as `prefill` and `forward_cached` consume theirs;
  the updated one is returned. Each layer's parameters and cache enter the loop as buffers of their own (copies made here,
  once): XLA:CPU copies a layer's slice of a stacked [L, ...] array on every read, which would
  triple the memory traffic of a step, and a step's time is the time to read the weights and the
  window. The cost is one extra copy of the layer weights while decoding."""
  attention = config.resolve_attention(attention)
  check_room(cache, attention, max_new_tokens)
  return _decode_checked(params, config, cache, logits_bv, next_pos_b, key, attention, sampling, max_new_tokens,
                         eos_ids, on_tokens)


def _decode_checked(params, config, cache, logits_bv, next_pos_b, key, attention, sampling, max_new_tokens, eos_ids,
                    on_tokens) -> Decoded:
  """`decode` under a resolved spec, for a cache with room."""
  rest = {name: x for name, x in params.items() if name != "layers"}
  layer_params = tuple(jax.tree.map(lambda x: x[layer:layer + 1], params["layers"])
                       for layer in range(config.num_layers))
  layer_caches = split_layers(cache, attention)
  for x in jax.tree.leaves(cache):
    if not isinstance(x, jax.core.Tracer):
      x.delete()
  state = _decode(rest, layer_params, config, layer_caches, logits_bv, next_pos_b, key, attention, sampling,
                  max_new_tokens, eos_ids, on_tokens)
  return Decoded(state.tokens_bn, state.lengths_b, state.logits_bv, state.pos_b, state.layer_caches, attention)


_stack_layers = jax.jit(stack_layers, static_argnames=("spec",))


@functools.partial(jax.jit, static_argnames=("config", "attention", "sampling", "max_new_tokens", "eos_ids",
                                             "on_tokens"), donate_argnames=("layer_caches",))
def _decode(rest, layer_params, config, layer_caches, logits_bv, next_pos_b, key, attention, sampling, max_new_tokens,
            eos_ids, on_tokens):
  model = Llama(config)
  b = logits_bv.shape[0]
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def forward_one(token_b, pos_b, layer_caches):  # logits [B, V] of one token per row, the caches
    x_b1d = model.apply({"params": rest}, token_b[:, None], method=Llama.embed)
    updated = []
    for layer, (p, layer_cache) in enumerate(zip(layer_params, layer_caches)):
      x_b1d, layer_cache = cached_layer(config, p, layer, x_b1d, pos_b[:, None], attention, layer_cache)
      updated.append(layer_cache)
    return model.apply({"params": rest}, x_b1d, method=Llama.logits)[:, 0], tuple(updated)

  def cond(state: DecodeState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done_b)

  def body(state: DecodeState) -> DecodeState:
    key, sub = jax.random.split(state.key) if sampling.temperature else (state.key, state.key)  # (greedy: no key)
    token_b = sample(state.logits_bv, sub, sampling)
    stop_b = jnp.isin(token_b, eos)
    if on_tokens is not None:
      stop_b |= io_callback(on_tokens, jax.ShapeDtypeStruct((b,), jnp.bool_), state.step, token_b, ordered=True)
    logits_bv, layer_caches = forward_one(token_b, state.pos_b, state.layer_caches)
    return DecodeState(state.step + 1, layer_caches, logits_bv, state.pos_b + 1, key, state.done_b | stop_b,
                       state.tokens_bn.at[:, state.step].set(token_b),
                       jnp.where(state.done_b, state.lengths_b, state.step + 1))

  state = DecodeState(jnp.int32(0), layer_caches, logits_bv, next_pos_b, key, jnp.zeros((b,), bool),
                      jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), jnp.int32))
  # (The state, caches included, is returned whole: the loop then runs in the donated cache buffers.)
  return jax.lax.while_loop(cond, body, state)


def left_pad(prompts: list[list[int]], chunk: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> left-padded tokens and positions [B, T] (T a multiple of chunk, pads at -1)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("empty prompt")
  t = -(-max(len(p) for p in prompts) // chunk) * chunk
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  positions = np.full((len(prompts), t), -1, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, t - len(prompt):] = prompt
    positions[row, t - len(prompt):] = np.arange(len(prompt))
  return tokens, positions


def generate(params: dict, config: LlamaConfig, prompts: list[list[int]], max_new_tokens: int,
             attention: AttentionMethod = Dense(), sampling: Sampling = Sampling(), key: jnp.ndarray | None = None,
             eos_ids: tuple[int, ...] | None = None, chunk: int | None = None, on_tokens: Callable | None = None,
             stats: dict | None = None) -> list[list[int]]:
  """Generates up to `max_new_tokens` after each prompt (token id lists); returns the new tokens
  of each row, up to and including its EOS / stop. The prompt is fed `chunk` tokens at a time
  (default: the method's `feed_chunk`; all at once where the RoPE frequencies depend on the call,
  dynamic and longrope, as transformers' `generate` prefills, unless the method feeds its own: infllm).
  Dense attention gets a cache of prompt + new tokens.
  `stats`, if given, receives prefill/decode seconds and token counts (compile included)."""
  if max_new_tokens <= 0:
    raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if chunk is not None and chunk <= 0:
    raise UserError(f"chunk must be positive, got {chunk}")
  spec = config.resolve_attention(attention)
  longest = max(len(p) for p in prompts or [[0]])
  if chunk is None and config.rope_scaling.per_call:  # (a chunk's frequencies are its own: docs/caches.md)
    chunk = longest
  chunk = min(spec.feed_chunk(chunk), longest)
  tokens, positions = left_pad(prompts, chunk)
  cache = init_cache(config, spec, len(prompts), max_len=tokens.shape[1] + max_new_tokens)
  start = time.perf_counter()
  check_room(cache, spec, tokens.shape[1] + max_new_tokens)  # (once: then the unchecked prefill and decode)
  logits_bv, cache = _prefill(params, config, cache, jnp.asarray(tokens), jnp.asarray(positions), spec,
                              *_feed(cache, spec, config, chunk, tokens.shape[1]))
  logits_bv.block_until_ready()
  prefilled = time.perf_counter()
  next_pos = jnp.asarray([len(p) for p in prompts], jnp.int32)
  key = jax.random.PRNGKey(0) if key is None else key
  eos = tuple(config.eos_token_ids) if eos_ids is None else tuple(eos_ids)
  decoded = _decode_checked(params, config, cache, logits_bv, next_pos, key, spec, sampling, max_new_tokens, eos,
                            on_tokens)
  out, lengths = np.asarray(decoded.tokens_bn), np.asarray(decoded.lengths_b)
  if stats is not None:
    stats.update(prefill_seconds=prefilled - start, decode_seconds=time.perf_counter() - prefilled,
                 prompt_tokens=sum(map(len, prompts)), new_tokens=int(lengths.sum()))
  return [out[row, :lengths[row]].tolist() for row in range(len(prompts))]
