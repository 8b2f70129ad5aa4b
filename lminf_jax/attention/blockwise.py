"""Flash-style building blocks shared by every attention method.

Axis letters: B batch, C query-chunk length, S key-block length, K kv heads, G query heads
per kv head, H head dim, N = K*G query heads.

A query chunk's attention is accumulated over key blocks with an online softmax (float32
running max `m`, normaliser `l` and weighted sum `acc`), so no [T, T] score matrix exists.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: fully masked rows stay NaN-free.
MASKED = -1e30


class SoftmaxState(NamedTuple):
  m_bkgc: jnp.ndarray
  l_bkgc: jnp.ndarray
  acc_bkgch: jnp.ndarray


def init_state(batch: int, kv_heads: int, groups: int, chunk: int, head_dim: int) -> SoftmaxState:
  shape = (batch, kv_heads, groups, chunk)
  return SoftmaxState(
      jnp.full(shape, MASKED, jnp.float32),
      jnp.zeros(shape, jnp.float32),
      jnp.zeros(shape + (head_dim,), jnp.float32),
  )


def update(state: SoftmaxState, q_bckgh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
           mask_bcs: jnp.ndarray) -> SoftmaxState:
  """Folds one key block into the running softmax. q is already rotated and scaled."""
  s_bkgcs = jnp.einsum("bckgh,bskh->bkgcs", q_bckgh, k_bskh, preferred_element_type=jnp.float32)
  mask_b11cs = mask_bcs[:, None, None]
  s_bkgcs = jnp.where(mask_b11cs, s_bkgcs, MASKED)
  m_new = jnp.maximum(state.m_bkgc, s_bkgcs.max(-1))
  p_bkgcs = jnp.where(mask_b11cs, jnp.exp(s_bkgcs - m_new[..., None]), 0.0)
  correction = jnp.exp(state.m_bkgc - m_new)
  l_new = state.l_bkgc * correction + p_bkgcs.sum(-1)
  pv_bkgch = jnp.einsum("bkgcs,bskh->bkgch", p_bkgcs.astype(v_bskh.dtype), v_bskh,
                        preferred_element_type=jnp.float32)
  return SoftmaxState(m_new, l_new, state.acc_bkgch * correction[..., None] + pv_bkgch)


def finish(state: SoftmaxState, dtype) -> jnp.ndarray:
  """Normalised output [B, C, K, G, H]; queries with no allowed key give 0."""
  l_bkgc = jnp.where(state.l_bkgc > 0, state.l_bkgc, 1.0)
  o_bkgch = state.acc_bkgch / l_bkgc[..., None]
  return jnp.transpose(o_bkgch, (0, 3, 1, 2, 4)).astype(dtype)


def split_chunks(x_bt: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """[B, T, ...] with T = n*C -> [n, B, C, ...] (the scan axis first)."""
  b, t = x_bt.shape[:2]
  return jnp.moveaxis(x_bt.reshape((b, t // chunk, chunk) + x_bt.shape[2:]), 1, 0)


def pad_to_multiple(x_bt: jnp.ndarray, multiple: int, value=0) -> jnp.ndarray:
  """Pads axis 1 at the end up to a multiple of `multiple`."""
  pad = -x_bt.shape[1] % multiple
  widths = [(0, 0)] * x_bt.ndim
  widths[1] = (0, pad)
  return jnp.pad(x_bt, widths, constant_values=value)


def extend_positions(positions_bt: jnp.ndarray, multiple: int) -> jnp.ndarray:
  """Pads positions at the end by continuing each row (padded queries are discarded)."""
  pad = -positions_bt.shape[1] % multiple
  tail_bp = positions_bt[:, -1:] + 1 + jnp.arange(pad, dtype=positions_bt.dtype)
  return jnp.concatenate([positions_bt, tail_bp], axis=1)


def block(x_bt: jnp.ndarray, start, size: int) -> jnp.ndarray:
  return jax.lax.dynamic_slice_in_dim(x_bt, start, size, axis=1)
