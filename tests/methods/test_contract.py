"""The contract of an attention method, over every row of the case table (tests/methods/cases.py):
one-shot against its numpy reference (left padding included), gradients, the flash kernels,
and through a cache: chunked, token by token and generating, each equal to the one-shot forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import SLOW
from naive_attention import _mask_and_distance, _params, default_inv_freq, naive_attention
from test_attention import _inputs, _ours
from test_kernels import KERNELS, _rows

from lminf_jax.attention import Rotary, attend, resolve
from lminf_jax.cache import init_cache
from lminf_jax.inference.forward import cached_token_nll, forward, forward_cached, token_nll
from lminf_jax.inference.generation import generate
from methods.cases import BY_NAME, CASES, Path, Sizes, model_spec, reference, with_path


# --- one-shot ------------------------------------------------------------------------------------


@settings(max_examples=40 if SLOW else 20, deadline=None)
@given(case=st.sampled_from(CASES), t=st.integers(1, 70), n_start=st.integers(0, 12), window=st.integers(1, 80),
       chunk=st.integers(1, 40), key_block=st.integers(1, 50), kv=st.integers(1, 3), groups=st.sampled_from([1, 2, 3]),
       h=st.sampled_from([2, 8, 16]), offset=st.integers(0, 1000), seed=st.integers(0, 2**16))
def test_one_shot_matches_the_reference(case, t, n_start, window, chunk, key_block, kv, groups, h, offset, seed):
  q, k, v = _inputs(seed, t, kv, groups, h)
  inv_freq = default_inv_freq(h)
  positions = np.arange(t) + offset
  sizes = Sizes(n_start, window, chunk, key_block)
  expected = reference(*case.naive(sizes), q, k, v, positions, inv_freq)
  np.testing.assert_allclose(_ours(q, k, v, positions, inv_freq, case.make(sizes)), expected, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_left_padding_equals_unpadded(case):
  t, pad = 45, 6
  q, k, v = _inputs(1, t, 2, 2, 8)
  inv_freq = default_inv_freq(8)
  sizes = Sizes(3, 10, 8, 5)
  positions = np.concatenate([np.full(pad, -1), np.arange(t - pad)])
  out = _ours(q, k, v, positions, inv_freq, case.make(sizes))
  expected = reference(*case.naive(sizes), q[pad:], k[pad:], v[pad:], np.arange(t - pad), inv_freq)
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


@pytest.mark.parametrize("case", with_path(Path.MASKED), ids=repr)
def test_gradients_match_the_reference(case):
  t = 33
  q, k, v = _inputs(2, t, 2, 2, 8)
  inv_freq = default_inv_freq(8)
  cotangent = np.random.default_rng(3).standard_normal((t, 4, 8)).astype(np.float32)
  sizes = Sizes(3, 9, 5, 4)
  spec = resolve(case.make(sizes), max_position_embeddings=1)
  naive_method, params = case.naive(sizes)
  positions = np.arange(t)
  allowed, dist = _mask_and_distance(q.astype(np.float64), k.astype(np.float64), inv_freq, positions, naive_method,
                                     _params(naive_method, params))
  np.testing.assert_allclose(_naive_jax(q, k, v, allowed, dist, inv_freq),
                             naive_attention(q, k, v, positions, inv_freq, naive_method, **params)[0], atol=1e-5)

  def ours(q, k, v):
    out = attend(q[None], k[None], v[None], jnp.asarray(positions)[None], Rotary(jnp.asarray(inv_freq, jnp.float32)), spec)
    return jnp.sum(out[0] * cotangent)

  def naive(q, k, v):
    return jnp.sum(_naive_jax(q, k, v, allowed, dist, inv_freq) * cotangent)

  grads = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(naive, argnums=(0, 1, 2))(q, k, v)
  for ours_g, ref_g in zip(grads, expected):
    np.testing.assert_allclose(ours_g, ref_g, atol=1e-4, rtol=1e-4)


# --- the flash kernels (splash in interpret mode; cuDNN's masks and merge through jax.nn's "xla") ---

# T = 200 (not a multiple of 128): windows below T, and lambda's above it too; dca: chunks of 43,
# the rows starting mid-chunk (10^8 mod 43 = 40), the padded one ending in another chunk
KERNEL_ROWS = ([(kernel, case, 48) for case in with_path(Path.KERNELS) for kernel in sorted(KERNELS)]
               + [(kernel, BY_NAME["lambda"], 300) for kernel in sorted(KERNELS)]
               + [("splash", case, 48) for case in with_path(Path.SPLASH)])


@pytest.mark.parametrize("kernel, case, window", KERNEL_ROWS,
                         ids=lambda x: f"w{x}" if isinstance(x, int) else x if isinstance(x, str) else repr(x))
def test_kernel_path_equals_xla_and_the_reference(kernel, case, window):
  sizes = Sizes(5, window, 512, 512)
  spec = resolve(case.make(sizes), max_position_embeddings=1)
  q, k, v, positions = _rows(7, 200, 4, 2, 16, pads=[0, 37], offset=10**8)
  inv_freq = default_inv_freq(16)
  args = [jnp.asarray(a) for a in (q, k, v, positions)] + [Rotary(jnp.asarray(inv_freq, jnp.float32))]
  o_kernel, lse_kernel = spec.kernel_attend(KERNELS[kernel], *args)
  o_xla, lse_xla = spec.xla_attend(*args)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(o_kernel), np.asarray(o_xla), atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse_kernel)[real], np.asarray(lse_xla)[real], atol=1e-5)
  expected = np.zeros(q.shape)
  for row, pos in enumerate(positions):
    expected[row, pos >= 0] = reference(*case.naive(sizes), q[row, pos >= 0], k[row, pos >= 0], v[row, pos >= 0],
                                        pos[pos >= 0], inv_freq)
  np.testing.assert_allclose(np.asarray(o_kernel), expected, atol=1e-5)
  assert np.all(np.asarray(o_kernel)[~real] == 0)


# --- through a cache, on a tiny model --------------------------------------------------------------

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 90)), jnp.int32)


# CI feeds chunks of 7 (crossing every block edge) and 45 (two calls); LMINF_SLOW=1 adds 1, 16 and 90
# (token by token: the decode tests below; block-aligned; one call).
@pytest.mark.parametrize("chunk", [7, 45, *(pytest.param(c, marks=pytest.mark.slow) for c in (1, 16, 90))])
@pytest.mark.parametrize("case", with_path(Path.CACHED) + with_path(Path.OWN_CHUNKS), ids=repr)
def test_cached_chunked_nll_equals_one_shot(tiny_model, case, chunk):
  """(A method that retrieves per query chunk is fed its own chunks: `chunk` is its option too.)"""
  config, params, _ = tiny_model
  spec = model_spec(case, chunk)
  expected = np.asarray(token_nll(params, config, TOKENS, attention=spec))
  got = np.asarray(cached_token_nll(params, config, TOKENS, attention=spec, chunk=chunk))
  np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("case", with_path(Path.DECODE), ids=repr)
def test_decode_logits_equal_one_shot(tiny_model, case):
  """Prefill 30 tokens in one chunk, then decode one token at a time: logits match the one-shot ones."""
  config, params, _ = tiny_model
  spec = resolve(model_spec(case, 16), config.max_position_embeddings)
  t = TOKENS.shape[1]
  expected = np.asarray(forward(params, config, TOKENS, attention=spec))
  cache = init_cache(config, spec, 2, max_len=t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), TOKENS.shape)
  logits, cache = forward_cached(params, config, cache, TOKENS[:, :30], positions[:, :30], spec)
  np.testing.assert_allclose(np.asarray(logits), expected[:, :30], atol=1e-4)
  for i in range(30, t):
    logits, cache = forward_cached(params, config, cache, TOKENS[:, i:i + 1], positions[:, i:i + 1], spec)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, i], atol=1e-4)


@pytest.mark.parametrize("case", with_path(Path.DECODE), ids=repr)
def test_generate_equals_one_shot_argmax(tiny_model, case):
  """Greedy generation (a prompt past the window, then decoding) picks the argmax of the one-shot
  logits of its own output."""
  config, params, _ = tiny_model
  spec = model_spec(case, 16)
  prompt = np.asarray(TOKENS[0, :40]).tolist()
  out = generate(params, config, [prompt], 12, attention=spec, eos_ids=())[0]
  assert len(out) == 12
  logits = forward(params, config, jnp.asarray([prompt + out]), attention=spec)
  np.testing.assert_array_equal(np.asarray(logits[0, 39:-1]).argmax(-1), out)
