"""Blockwise attention methods against the naive dense-masked numpy reference (DESIGN.md section 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_attention import default_inv_freq, naive_attention

from lminf_jax.attention import Dense, attend

jax.config.update("jax_enable_x64", False)


def _inputs(seed: int, t: int, kv: int, groups: int, h: int):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((t, kv * groups, h)).astype(np.float32)
  k = rng.standard_normal((t, kv, h)).astype(np.float32)
  v = rng.standard_normal((t, kv, h)).astype(np.float32)
  return q, k, v


def _ours(q, k, v, positions, inv_freq, spec, layer=0):
  out = attend(jnp.asarray(q)[None], jnp.asarray(k)[None], jnp.asarray(v)[None], jnp.asarray(positions)[None],
               jnp.asarray(inv_freq, jnp.float32), spec, layer)
  return np.asarray(out[0])


shapes = dict(t=st.integers(1, 70), kv=st.integers(1, 3), groups=st.sampled_from([1, 2, 3]),
              h=st.sampled_from([2, 8, 16]), chunk=st.integers(1, 80), seed=st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_dense_matches_naive(t, kv, groups, h, chunk, seed):
  q, k, v = _inputs(seed, t, kv, groups, h)
  inv_freq = default_inv_freq(h)
  expected, _ = naive_attention(q, k, v, np.arange(t), inv_freq, "dense")
  np.testing.assert_allclose(_ours(q, k, v, np.arange(t), inv_freq, Dense(chunk=chunk)), expected, atol=1e-5)


def test_dense_left_padding_ignores_pad_keys():
  """Row 0 is left-padded by 5 tokens (positions -1): its real tokens equal the unpadded run."""
  t, pad = 21, 5
  q, k, v = _inputs(0, t, 2, 2, 8)
  inv_freq = default_inv_freq(8)
  positions = np.concatenate([np.full(pad, -1), np.arange(t - pad)])
  out = _ours(q, k, v, positions, inv_freq, Dense(chunk=4))
  expected, _ = naive_attention(q[pad:], k[pad:], v[pad:], np.arange(t - pad), inv_freq, "dense")
  np.testing.assert_allclose(out[pad:], expected, atol=1e-5)
  assert np.all(out[:pad] == 0)
