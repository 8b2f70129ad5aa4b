"""Jitted forward passes over params: logits and per-token negative log-likelihoods."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lminf_jax.attention import Dense
from lminf_jax.attention.blockwise import pad_to_multiple, split_chunks
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
  """NLL [B, T-1] (float32) of token t+1 given tokens 0..t.

  Logits are computed `logits_chunk` positions at a time, so [T, V] never exists at once.
  """
  model = Llama(config)
  x_btd = model.apply({"params": params}, tokens_bt, positions_bt, attention, method=Llama.hidden)[:, :-1]
  targets_bt = tokens_bt[:, 1:]
  t = targets_bt.shape[1]
  chunk = min(logits_chunk, t)

  def step(_, xs):
    x_bcd, target_bc = xs
    logits_bcv = model.apply({"params": params}, x_bcd, method=Llama.unembed)
    picked_bc = jnp.take_along_axis(logits_bcv, target_bc[..., None], axis=-1)[..., 0]
    return None, jax.nn.logsumexp(logits_bcv, axis=-1) - picked_bc

  xs = (split_chunks(pad_to_multiple(x_btd, chunk), chunk), split_chunks(pad_to_multiple(targets_bt, chunk), chunk))
  _, nll_nbc = jax.lax.scan(step, None, xs)
  return jnp.moveaxis(nll_nbc, 0, 1).reshape(tokens_bt.shape[0], -1)[:, :t]
