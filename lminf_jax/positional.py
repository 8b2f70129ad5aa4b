"""How positions enter attention logits: `Rotary` (RoPE) or `ALiBi`, each with an optional
logit soft-cap. Every method takes one of them (`pe`) and never asks which.

A method works with small integer offsets (a position minus a per-chunk reference, or the
distance its rule assigns). It `rotate`s a query tile and a key tile by their offsets and
`blockwise.scores` turns the pair into logits: q.k for RoPE (the rotation carries the distance),
q.k - slope * (q_offset - k_offset) for ALiBi (no rotation), then `cap * tanh(s / cap)` if the
model caps its logits. So ALiBi uses exactly the distances a method uses for RoPE
(docs/semantics.md#alibi-models), and only differences of positions enter either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.rope import apply_rope


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inv_freq_h"], meta_fields=["softcap"])
@dataclasses.dataclass(frozen=True)
class Rotary:
  """RoPE with inverse frequencies [R/2] (R < H: only the first R dims of a head rotate)."""

  inv_freq_h: jnp.ndarray
  softcap: float | None = None

  rotates = True  # (keys rotated in a cache ring stay valid from their anchor: ring.anchored)

  def rotate(self, x: jnp.ndarray, offsets: jnp.ndarray) -> jnp.ndarray:
    """x [..., H] rotated by integer offsets broadcastable to x.shape[:-1]."""
    return apply_rope(x, offsets, self.inv_freq_h)

  def logits(self, s_bkms: jnp.ndarray, q_off_bm: jnp.ndarray, k_off_bs: jnp.ndarray) -> jnp.ndarray:
    return cap(s_bkms, self.softcap)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["slopes_n"], meta_fields=["softcap"])
@dataclasses.dataclass(frozen=True)
class ALiBi:
  """ALiBi (Press et al., 2022): a key at distance d adds -slope_n * d to head n's logit."""

  slopes_n: jnp.ndarray
  softcap: float | None = None

  rotates = False

  def rotate(self, x: jnp.ndarray, offsets: jnp.ndarray) -> jnp.ndarray:
    return x

  def logits(self, s_bkms: jnp.ndarray, q_off_bm: jnp.ndarray, k_off_bs: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, K, M, S] of a query tile (row m = g*C + c of kv head k is query head k*G + g)
    plus the bias of each row's and key's offsets [B, M] and [B, S]."""
    kv_heads, rows = s_bkms.shape[1], s_bkms.shape[2]
    slope_kg = self.slopes_n.astype(jnp.float32).reshape(kv_heads, -1)
    slope_km = jnp.repeat(slope_kg, rows // slope_kg.shape[1], axis=1)
    d_bms = (q_off_bm[:, :, None] - k_off_bs[:, None, :]).astype(jnp.float32)
    return cap(s_bkms - slope_km[None, :, :, None] * d_bms[:, None], self.softcap)


Positional = Rotary | ALiBi


def cap(s: jnp.ndarray, softcap: float | None) -> jnp.ndarray:
  """Logit soft-capping, softcap * tanh(s / softcap) (None: s unchanged)."""
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
  """MPT's per-head ALiBi slopes [N] (float32): 2^(-bias_max * i / N') for i = 1..N', N' the
  next power of two; for N < N', the odd-numbered then the even-numbered of them, first N."""
  n2 = 1 << max(0, (num_heads - 1).bit_length())
  slopes = 1.0 / np.power(2.0, np.arange(1, n2 + 1, dtype=np.float64) * (bias_max / n2))
  if n2 != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)
