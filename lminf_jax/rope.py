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
  longrope (its long factors with `long`, else its short ones). R, the rotated part of a head,
  is H unless the model rotates only a part (Phi-3's partial_rotary_factor)."""
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
  return inv_freq.astype(np.float32)


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
