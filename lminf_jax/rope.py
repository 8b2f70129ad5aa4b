"""Half-split ("rotate_half") rotary position embedding, the Hugging Face layout.

Angles are always computed from small integer offsets (a position minus a reference
position), so RoPE stays exact for streams of 10^8 tokens: float32 loses the angle of
absolute positions past about 10^6.

The angle offset * inv_freq itself is rounded to float32 (relative 2^-24: 1.5e-5 rad at offset
511, 1e-3 at 32K). Its rounding error is recovered exactly and cos/sin corrected for it, so
rotations are good to about 1e-7 for offsets below 2^16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(rotary_dim: int, theta: float, scaling, long: bool = False) -> np.ndarray:
  """Inverse frequencies [R/2], float32, for RoPE scaling kinds default / linear / llama3 /
  longrope (its long factors with `long`, else its short ones) / ntk / yarn, and dynamic within its
  original length, where it is default (past it: `dynamic_inv_frequencies`). R, the rotated part of
  a head, is H unless the model rotates only a part (Phi-3's partial_rotary_factor)."""
  if scaling.kind == "ntk":  # (fixed NTK-aware scaling: the base times factor^(R/(R-2)))
    theta = theta * scaling.factor ** (rotary_dim / (rotary_dim - 2))
  wavelength = theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim)
  inv_freq = 1.0 / wavelength
  if scaling.kind == "longrope":
    inv_freq = 1.0 / (np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32) * wavelength)
  elif scaling.kind == "linear":
    inv_freq = inv_freq / scaling.factor
  elif scaling.kind == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  elif scaling.kind == "yarn":
    inv_freq = _yarn(inv_freq, rotary_dim, theta, scaling)
  return inv_freq.astype(np.float32)


def _yarn(inv_freq_h: np.ndarray, rotary_dim: int, theta: float, scaling) -> np.ndarray:
  """YaRN (Peng et al., 2023) as transformers computes it: frequency k keeps its value (extrapolation)
  below dim `low`, is divided by `factor` (interpolation) above dim `high`, and blends linearly
  between; `low` and `high` are the dims whose wavelengths fit beta_fast and beta_slow rotations
  into the original length (rounded out to whole dims with `truncate`, clipped to [0, R - 1])."""

  def dim_of(rotations: float) -> float:  # (the dim d at which original * theta^(-d/R) = 2 pi rotations)
    return rotary_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # (transformers' guard against a zero-width ramp)
  ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  return (inv_freq_h / scaling.factor) * ramp + inv_freq_h * (1 - ramp)


def dynamic_inv_frequencies(rotary_dim: int, theta: float, scaling, length: jnp.ndarray) -> jnp.ndarray:
  """Dynamic NTK's inverse frequencies [R/2] (float32, traced) for a call whose largest position + 1
  is `length` (an int scalar): the base theta * (factor * L / original - (factor - 1))^(R/(R-2)),
  L = max(length, original), computed in float32 as transformers computes it."""
  original = scaling.original_max_position_embeddings
  seq_len = jnp.maximum(length, original).astype(jnp.float32)
  base = theta * (scaling.factor * seq_len / original - (scaling.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
  return 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


def apply_rope(x: jnp.ndarray, offsets: jnp.ndarray, inv_freq_h: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [..., H] by integer position offsets broadcastable to x.shape[:-1] (small:
  relative to a reference position). Computed in float32, cast back to x's dtype. With R/2
  frequencies for R < H, only the first R dims rotate (half-split within them); the rest pass."""
  cos, sin = _cos_sin(offsets.astype(jnp.float32)[..., None], inv_freq_h.astype(jnp.float32))
  r = 2 * inv_freq_h.shape[-1]
  x1, x2 = jnp.split(x[..., :r].astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return rotated if r == x.shape[-1] else jnp.concatenate([rotated, x[..., r:]], axis=-1)


def _cos_sin(offsets: jnp.ndarray, inv_freq_h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos and sin of offsets * inv_freq (float32), corrected for the rounding of the angle.

  inv_freq = f1 + f2 + f3, each part of at most 8 significant bits, so each offset * part is
  exact for |offset| < 2^16, and so is (offsets * f1 - angle) (Sterbenz): err is the angle's
  rounding error, |err| <= half an ulp of the angle; cos/sin(angle + err) to second order in err.
  """
  f1_h = _top_8_bits(inv_freq_h)
  f2_h = _top_8_bits(inv_freq_h - f1_h)
  f3_h = (inv_freq_h - f1_h) - f2_h
  angle = offsets * inv_freq_h
  err = ((offsets * f1_h - angle) + offsets * f2_h) + offsets * f3_h
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  keep = 1 - 0.5 * err * err
  return cos * keep - sin * err, sin * keep + cos * err


def _top_8_bits(x: jnp.ndarray) -> jnp.ndarray:
  """float32 x with all but its 8 leading significant bits cleared (x minus it is exact)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-(1 << 16))
  return jax.lax.bitcast_convert_type(bits, jnp.float32)
