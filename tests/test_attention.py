"""Blockwise attention methods against the naive dense-masked numpy reference (docs/semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_attention import _mask_and_distance, _params, default_inv_freq, naive_attention, rope

from lminf_jax.attention import Dense, Lambda, Rotary, Streaming, attend, resolve

# method name -> (our spec from the drawn sizes, naive method + params)
METHODS = {
    "dense": lambda g, w, c, s: (Dense(chunk=c, key_block=s), ("dense", {})),
    "lambda": lambda g, w, c, s: (Lambda(n_global=g, n_local=w, limit=w, chunk=c, key_block=s),
                                  ("lambda", dict(n_global=g, n_local=w, limit=w))),
    "lambda_limit": lambda g, w, c, s: (Lambda(n_global=g, n_local=w, limit=w + 7, chunk=c, key_block=s),
                                        ("lambda", dict(n_global=g, n_local=w, limit=w + 7))),
    "lambda_no_mask": lambda g, w, c, s: (Lambda(n_global=g, n_local=w, mask=False, chunk=c, key_block=s),
                                          ("lambda", dict(n_global=g, n_local=w, mask=False))),
    "lambda_no_limit": lambda g, w, c, s: (Lambda(n_global=g, n_local=w, distance_limit=False, chunk=c, key_block=s),
                                           ("lambda", dict(n_global=g, n_local=w, use_limit=False))),
    "streaming": lambda g, w, c, s: (Streaming(n_sink=g, n_recent=w, chunk=c, key_block=s),
                                     ("streaming", dict(n_sink=g, n_recent=w))),
}


def _inputs(seed: int, t: int, kv: int, groups: int, h: int):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((t, kv * groups, h)).astype(np.float32)
  k = rng.standard_normal((t, kv, h)).astype(np.float32)
  v = rng.standard_normal((t, kv, h)).astype(np.float32)
  return q, k, v


def _ours(q, k, v, positions, inv_freq, spec, layer=0):
  spec = resolve(spec, max_position_embeddings=1)  # every test spec sets its lengths explicitly
  out = attend(jnp.asarray(q)[None], jnp.asarray(k)[None], jnp.asarray(v)[None], jnp.asarray(positions)[None],
               Rotary(jnp.asarray(inv_freq, jnp.float32)), spec, layer)
  return np.asarray(out[0])


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(METHODS)), t=st.integers(1, 70), n_start=st.integers(0, 12),
       window=st.integers(1, 80), chunk=st.integers(1, 40), key_block=st.integers(1, 50), kv=st.integers(1, 3),
       groups=st.sampled_from([1, 2, 3]),
       h=st.sampled_from([2, 8, 16]), offset=st.integers(0, 1000), seed=st.integers(0, 2**16))
def test_method_matches_naive(method, t, n_start, window, chunk, key_block, kv, groups, h, offset, seed):
  q, k, v = _inputs(seed, t, kv, groups, h)
  inv_freq = default_inv_freq(h)
  positions = np.arange(t) + offset
  spec, (naive_method, params) = METHODS[method](n_start, window, chunk, key_block)
  expected, _ = naive_attention(q, k, v, positions, inv_freq, naive_method, **params)
  np.testing.assert_allclose(_ours(q, k, v, positions, inv_freq, spec), expected, atol=1e-5)


@pytest.mark.parametrize("layer", [3, 4, 9])
@pytest.mark.parametrize("t, top_k", [(90, 5), (90, 200), (40, 5), (25, 3)])
def test_lambda_top_k_middle_tokens_match_naive(layer, t, top_k):
  """Last query gains the top_k middle keys at distance insert_at, from layer top_k_from_layer on."""
  q, k, v = _inputs(t + layer, t, 2, 2, 16)
  inv_freq = default_inv_freq(16)
  spec = Lambda(n_global=4, n_local=16, top_k=top_k, top_k_from_layer=4, top_k_insert_at=24, chunk=7, key_block=9)
  expected, _ = naive_attention(q, k, v, np.arange(t), inv_freq, "lambda", n_global=4, n_local=16, top_k=top_k,
                                top_k_from_layer=4, insert_at=24, layer=layer)
  np.testing.assert_allclose(_ours(q, k, v, np.arange(t), inv_freq, spec, layer), expected, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_left_padding_equals_unpadded(method):
  t, pad = 45, 6
  q, k, v = _inputs(1, t, 2, 2, 8)
  inv_freq = default_inv_freq(8)
  spec, (naive_method, params) = METHODS[method](3, 10, 8, 5)
  positions = np.concatenate([np.full(pad, -1), np.arange(t - pad)])
  out = _ours(q, k, v, positions, inv_freq, spec)
  expected, _ = naive_attention(q[pad:], k[pad:], v[pad:], np.arange(t - pad), inv_freq, naive_method, **params)
  np.testing.assert_allclose(out[pad:], expected, atol=1e-5)
  assert np.all(out[:pad] == 0)


def _naive_jax(q, k, v, allowed, dist, inv_freq):
  """jax version of the reference's logits/softmax over its own mask and distance matrix."""
  n, h = q.shape[1], q.shape[2]
  g = n // k.shape[1]
  angle_tth = jnp.asarray(-dist[..., None] * inv_freq, jnp.float32)  # rotate k_j by -(p_i - p_j)
  cos, sin = jnp.cos(angle_tth)[:, :, None], jnp.sin(angle_tth)[:, :, None]
  k1, k2 = jnp.split(jnp.repeat(k, g, axis=1)[None], 2, axis=-1)  # [1, T, N, H/2]
  k_rot = jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)  # [T_i, T_j, N, H]
  logits = jnp.einsum("inh,ijnh->nij", q, k_rot) / np.sqrt(h)
  logits = jnp.where(allowed, logits, -jnp.inf)
  return jnp.einsum("nij,jnh->inh", jax.nn.softmax(logits, axis=-1), jnp.repeat(v, g, axis=1))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_match_naive(method):
  t = 33
  q, k, v = _inputs(2, t, 2, 2, 8)
  inv_freq = default_inv_freq(8)
  cotangent = np.random.default_rng(3).standard_normal((t, 4, 8)).astype(np.float32)
  spec, (naive_method, params) = METHODS[method](3, 9, 5, 4)
  spec = resolve(spec, max_position_embeddings=1)
  positions = np.arange(t)
  allowed, dist = _mask_and_distance(q.astype(np.float64), k.astype(np.float64), inv_freq, positions, naive_method,
                                     _params(naive_method, params))
  np.testing.assert_allclose(_naive_jax(q, k, v, allowed, dist, inv_freq),
                             naive_attention(q, k, v, positions, inv_freq, naive_method, **params)[0], atol=1e-5)

  def ours(q, k, v):
    out = attend(q[None], k[None], v[None], jnp.asarray(positions)[None], Rotary(jnp.asarray(inv_freq, jnp.float32)), spec)
    return jnp.sum(out[0] * cotangent)

  def reference(q, k, v):
    return jnp.sum(_naive_jax(q, k, v, allowed, dist, inv_freq) * cotangent)

  grads = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(reference, argnums=(0, 1, 2))(q, k, v)
  for ours_g, ref_g in zip(grads, expected):
    np.testing.assert_allclose(ours_g, ref_g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lambda", "streaming", "lambda_limit"])
def test_offset_1e8_gives_the_same_output(method):
  t = 300
  q, k, v = _inputs(4, t, 1, 3, 64)
  inv_freq = default_inv_freq(64, 100000.0)
  spec, _ = METHODS[method](10, 64, 48, 40)
  at_zero = _ours(q, k, v, np.arange(t), inv_freq, spec)
  at_1e8 = _ours(q, k, v, np.arange(t) + 10**8, inv_freq, spec)
  np.testing.assert_allclose(at_1e8, at_zero, atol=1e-5)


def test_naive_rope_is_the_model_rope():
  """The reference's rope and ours agree (they are the two halves of every comparison above)."""
  from lminf_jax.rope import apply_rope

  x = np.random.default_rng(5).standard_normal((1, 7, 3, 16)).astype(np.float32)
  pos = np.arange(7)[None] * 13 - 20
  inv_freq = default_inv_freq(16)
  ours = apply_rope(jnp.asarray(x), jnp.asarray(pos)[..., None], jnp.asarray(inv_freq, jnp.float32))
  np.testing.assert_allclose(ours, rope(x, pos[..., None], inv_freq), atol=2e-6)


def _temp_bytes(spec, t: int) -> int:
  shape_q = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
  shape_pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
  inv_freq = Rotary(jnp.asarray(default_inv_freq(8), jnp.float32))
  fn = jax.jit(lambda q, k, v, pos: attend(q, k, v, pos, inv_freq, resolve(spec, 1)))
  return fn.lower(shape_q, shape_q, shape_q, shape_pos).compile().memory_analysis().temp_size_in_bytes


def test_lambda_temporary_memory_is_linear_in_length():
  """XLA's compiled memory analysis at T = 16K, 32K, 64K: temporaries grow like T, not T^2."""
  spec = Lambda(n_global=10, n_local=2048, chunk=512)
  sizes = {t: _temp_bytes(spec, t) for t in (16384, 32768, 65536)}
  assert sizes[65536] <= 2.2 * sizes[32768] and sizes[32768] <= 2.2 * sizes[16384], sizes
  assert sizes[65536] < 65536 * (10 + 2048 + 512) * 4, sizes  # far below one [T, band] fp32 matrix
