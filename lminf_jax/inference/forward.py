"""Jitted forward passes over params: logits and per-token negative log-likelihoods."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lminf_jax.attention import Dense
from lminf_jax.attention.blockwise import pad_to_multiple, split_chunks
from lminf_jax.cache import Cache, check_room, init_cache
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import Llama


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def forward(params: dict, config: LlamaConfig, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray | None = None,
            attention=Dense()) -> jnp.ndarray:
  """Logits [B, T, V] (float32). Positions default to 0..T-1; negative positions mark left padding."""
  return Llama(config).apply({"params": params}, tokens_bt, positions_bt, attention)


@functools.partial(jax.jit, static_argnames=("config", "attention", "logits_chunk"))
def token_nll(params: dict, config: LlamaConfig, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray | None = None,
              attention=Dense(), logits_chunk: int = 1024) -> jnp.ndarray:
  """NLL [B, T-1] (float32) of token t+1 given tokens 0..t, in one forward pass.

  Logits are computed `logits_chunk` positions at a time, so [T, V] never exists at once.
  """
  model = Llama(config)
  x_btd = model.apply({"params": params}, tokens_bt, positions_bt, attention, method=Llama.hidden)
  return nll_from_hidden(model, params, x_btd, tokens_bt, logits_chunk)


@functools.partial(jax.jit, static_argnames=("config", "attention", "chunk", "logits_chunk"))
def cached_token_nll(params: dict, config: LlamaConfig, tokens_bt: jnp.ndarray, attention=Dense(),
                     chunk: int | None = None, logits_chunk: int = 1024) -> jnp.ndarray:
  """`token_nll` computed by feeding the tokens through a fixed-size cache, `chunk` at a time
  (a `lax.scan`; default: the method's `feed_chunk`); dense gets a cache of length T. Equal to
  the one-shot result."""
  model = Llama(config)
  b, t = tokens_bt.shape
  chunk = min(config.resolve_attention(attention).feed_chunk(chunk), t)
  cache = init_cache(config, attention, b, max_len=t)
  positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Padding at the end carries position -1: the cache skips it.
  xs = (split_chunks(pad_to_multiple(tokens_bt, chunk), chunk),
        split_chunks(pad_to_multiple(positions_bt, chunk, -1), chunk))

  def step(cache, xs):
    tokens_bc, positions_bc = xs
    x_bcd, cache = model.apply({"params": params}, tokens_bc, positions_bc, attention, cache, method=Llama.hidden)
    return cache, x_bcd

  _, x_nbcd = jax.lax.scan(step, cache, xs)
  x_btd = jnp.moveaxis(x_nbcd, 0, 1).reshape(b, -1, x_nbcd.shape[-1])[:, :t]
  return nll_from_hidden(model, params, x_btd, tokens_bt, logits_chunk)


def nll_from_hidden(model: Llama, params: dict, x_btd: jnp.ndarray, tokens_bt: jnp.ndarray,
                    logits_chunk: int) -> jnp.ndarray:
  """NLL [B, T-1] of tokens 1.. from final hidden states [B, T, D], `logits_chunk` positions at a
  time; each chunk is rematerialised, so a gradient never holds more than one [B, chunk, V] either.

  A chunk takes every N-th position (N chunks, strided), not N consecutive ones: where T is split
  over a sequence mesh, each chunk is then split with it, so no device holds a whole chunk's logits."""
  b, t = tokens_bt.shape
  targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))  # (the last position's is dropped: x keeps its split)
  chunk = min(logits_chunk, t)
  n = -(-t // chunk)  # chunks; position c * n + i is row c of chunk i

  def step(_, xs):
    x_bcd, target_bc = xs
    logits_bcv = model.apply({"params": params}, x_bcd, method=Llama.unembed)
    picked_bc = jnp.take_along_axis(logits_bcv, target_bc[..., None], axis=-1)[..., 0]
    return None, jax.nn.logsumexp(logits_bcv, axis=-1) - picked_bc

  strided = lambda a: jnp.moveaxis(pad_to_multiple(a, n).reshape(b, -1, n, *a.shape[2:]), 2, 0)  # noqa: E731
  _, nll_nbc = jax.lax.scan(jax.checkpoint(step), None, (strided(x_btd), strided(targets_bt)))
  return jnp.moveaxis(nll_nbc, 0, 2).reshape(b, -1)[:, :t - 1]


def forward_cached(params: dict, config: LlamaConfig, cache: Cache, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray,
                   attention) -> tuple[jnp.ndarray, Cache]:
  """Feeds a chunk through the cache (donated): (logits [B, T, V], updated cache). Negative
  positions: padding. More tokens than a dense cache, a ring shorter than its window or an
  infllm pool holds is an error (under the caller's jit: NaN logits for the rows that overflow)."""
  attention = config.resolve_attention(attention)
  check_room(cache, attention, jnp.sum(jnp.asarray(positions_bt) >= 0, axis=1))
  return _forward_cached(params, config, cache, tokens_bt, positions_bt, attention)


@functools.partial(jax.jit, static_argnames=("config", "attention"), donate_argnames=("cache",))
def _forward_cached(params, config, cache, tokens_bt, positions_bt, attention):
  return Llama(config).apply({"params": params}, tokens_bt, positions_bt, attention, cache)
