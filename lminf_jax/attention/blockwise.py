"""Flash-style building blocks shared by every attention method.

Axis letters: B batch, T length, C query-chunk length, S key-block length, K kv heads,
G query heads per kv head, H head dim, N = K*G query heads.

A query chunk's attention is accumulated over key blocks with an online softmax (float32
running max `m`, normaliser `l` and weighted sum `acc`), so no [T, T] score matrix exists.
Masks use sequence indices (`idx`: 0 at a row's first real token, negative for left padding);
positions only enter RoPE, always as small differences from a per-chunk reference.
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


def scores(q_bckgh: jnp.ndarray, k_bskh: jnp.ndarray) -> jnp.ndarray:
  """Float32 logits [B, K, G, C, S] of rotated, pre-scaled queries against rotated keys."""
  return jnp.einsum("bckgh,bskh->bkgcs", q_bckgh, k_bskh, preferred_element_type=jnp.float32)


def update(state: SoftmaxState, s_bkgcs: jnp.ndarray, v_bskh: jnp.ndarray, mask_bcs: jnp.ndarray) -> SoftmaxState:
  """Folds one key block (its logits, values and [B, C, S] mask) into the running softmax."""
  mask_b11cs = mask_bcs[:, None, None]
  s_bkgcs = jnp.where(mask_b11cs, s_bkgcs, MASKED)
  m_new = jnp.maximum(state.m_bkgc, s_bkgcs.max(-1))
  p_bkgcs = jnp.where(mask_b11cs, jnp.exp(s_bkgcs - m_new[..., None]), 0.0)
  correction = jnp.exp(state.m_bkgc - m_new)
  l_new = state.l_bkgc * correction + p_bkgcs.sum(-1)
  pv_bkgch = jnp.einsum("bkgcs,bskh->bkgch", p_bkgcs.astype(v_bskh.dtype), v_bskh,
                        preferred_element_type=jnp.float32)
  return SoftmaxState(m_new, l_new, state.acc_bkgch * correction[..., None] + pv_bkgch)


def finish(state: SoftmaxState, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(output [B, C, N, H], log-sum-exp [B, C, N]); a query with no allowed key gives 0."""
  b, kv, g, c = state.l_bkgc.shape
  l_bkgc = jnp.where(state.l_bkgc > 0, state.l_bkgc, 1.0)
  o_bkgch = state.acc_bkgch / l_bkgc[..., None]
  lse_bkgc = jnp.where(state.l_bkgc > 0, state.m_bkgc + jnp.log(l_bkgc), MASKED)
  o_bcnh = jnp.transpose(o_bkgch, (0, 3, 1, 2, 4)).reshape(b, c, kv * g, -1).astype(dtype)
  return o_bcnh, jnp.transpose(lse_bkgc, (0, 3, 1, 2)).reshape(b, c, kv * g)


class Padded(NamedTuple):
  """Inputs padded at the end to a multiple of the chunk length."""

  q_btnh: jnp.ndarray
  k_btkh: jnp.ndarray
  v_btkh: jnp.ndarray
  positions_bt: jnp.ndarray
  idx_bt: jnp.ndarray  # sequence index: 0 at each row's first real token, negative for left padding
  length: int  # T before padding
  chunk: int  # C

  @property
  def num_chunks(self) -> int:
    return self.positions_bt.shape[1] // self.chunk


def pad_inputs(q_btnh, k_btkh, v_btkh, positions_bt, chunk: int) -> Padded:
  """Pads T up to a multiple of C = min(chunk, T). Padded tail queries are discarded later;
  padded tail keys lie in every real query's future, so causal masks exclude them."""
  t = q_btnh.shape[1]
  chunk = min(chunk, t)
  pad = -t % chunk
  positions_bt = positions_bt.astype(jnp.int32)
  tail_bp = positions_bt[:, -1:] + 1 + jnp.arange(pad, dtype=jnp.int32)
  positions_bt = jnp.concatenate([positions_bt, tail_bp], axis=1)
  first_b = jnp.sum(positions_bt < 0, axis=1, dtype=jnp.int32)
  idx_bt = jnp.arange(t + pad, dtype=jnp.int32)[None] - first_b[:, None]
  q_btnh, k_btkh, v_btkh = (pad_to_multiple(x, chunk) for x in (q_btnh, k_btkh, v_btkh))
  return Padded(q_btnh, k_btkh, v_btkh, positions_bt, idx_bt, t, chunk)


def unsplit_chunks(x_nbc: jnp.ndarray, length: int) -> jnp.ndarray:
  """Scan output [n, B, C, ...] -> [B, T, ...] cut back to the unpadded length."""
  x_bnc = jnp.moveaxis(x_nbc, 0, 1)
  return x_bnc.reshape((x_bnc.shape[0], -1) + x_bnc.shape[3:])[:, :length]


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


def block(x_bt: jnp.ndarray, start, size: int) -> jnp.ndarray:
  return jax.lax.dynamic_slice_in_dim(x_bt, start, size, axis=1)


def group_heads(x_bcnh: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
  """[B, C, N, H] -> [B, C, K, G, H]."""
  b, c, n, h = x_bcnh.shape
  return x_bcnh.reshape(b, c, kv_heads, n // kv_heads, h)
