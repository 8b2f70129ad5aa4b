"""Blockwise attention methods against the naive dense-masked numpy reference (docs/semantics.md),
beyond the contract every method keeps (tests/methods/test_contract.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from methods.cases import BY_NAME
from naive_attention import default_inv_freq, naive_attention, rope

from lminf_jax.attention import Lambda, Rotary, attend, resolve

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


@pytest.mark.parametrize("method", ["lambda", "streaming", "lambda_limit"])
def test_offset_1e8_gives_the_same_output(method):
  t = 300
  q, k, v = _inputs(4, t, 1, 3, 64)
  inv_freq = default_inv_freq(64, 100000.0)
  spec = BY_NAME[method].spec(10, 64, 48, 40)
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
