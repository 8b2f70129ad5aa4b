"""ALiBi and logit soft-capping through every method (docs/semantics.md#alibi-models), one-shot, against the
naive numpy reference (itself checked against transformers' MptAttention and Gemma2Attention in
test_naive_attention.py). Cached paths: tests/test_parity.py (a tiny MPT model)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SLOW
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_attention import default_inv_freq, naive_attention
from methods.cases import Path, Sizes, with_path
from test_attention import _inputs

from lminf_jax.attention import ALiBi, Dense, InfLLM, Lambda, Rotary, attend, resolve
from lminf_jax.attention.kernels import Splash
from lminf_jax.errors import UserError
from lminf_jax.positional import alibi_slopes


def _attend(q, k, v, positions, pe, spec):
  spec = resolve(spec, max_position_embeddings=1)
  return np.asarray(attend(*(jnp.asarray(x)[None] for x in (q, k, v, positions)), pe, spec)[0])


@settings(max_examples=40 if SLOW else 15, deadline=None)
@given(case=st.sampled_from(with_path(Path.MASKED)), t=st.integers(1, 60), n_start=st.integers(0, 10),
       window=st.integers(1, 70), chunk=st.integers(1, 40), key_block=st.integers(1, 50), kv=st.integers(1, 3),
       groups=st.sampled_from([1, 2, 3]), h=st.sampled_from([4, 8]), offset=st.sampled_from([0, 37, 10**8]),
       softcap=st.sampled_from([None, 1.5]), seed=st.integers(0, 2**16))
def test_alibi_matches_naive(case, t, n_start, window, chunk, key_block, kv, groups, h, offset, softcap, seed):
  """Every masked method with ALiBi (and soft-capping): the bias of the method's own distances at the
  row's positions (a band method's depend on differences only: the same at offset 10^8 as at 0;
  selfextend's groups and dca's chunks are of the positions themselves)."""
  q, k, v = _inputs(seed, t, kv, groups, h)
  q, k = 3 * q, 3 * k  # (logits of several units, so the cap bites)
  slopes = alibi_slopes(kv * groups)
  sizes = Sizes(n_start, window, chunk, key_block)
  spec, (naive_method, params) = case.make(sizes), case.naive(sizes)
  positions = np.arange(t) + offset
  expected, _ = naive_attention(q, k, v, positions, None, naive_method, alibi_slopes=slopes, softcap=softcap,
                                **params)
  ours = _attend(q, k, v, positions, ALiBi(jnp.asarray(slopes), softcap), spec)
  np.testing.assert_allclose(ours, expected, atol=2e-5)


@settings(max_examples=25 if SLOW else 12, deadline=None)
@given(case=st.sampled_from(with_path(Path.MASKED)), t=st.integers(1, 60), n_start=st.integers(0, 10),
       window=st.integers(1, 70), chunk=st.integers(1, 40), kv=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       offset=st.integers(0, 1000), seed=st.integers(0, 2**16))
def test_rope_softcap_matches_naive(case, t, n_start, window, chunk, kv, groups, offset, seed):
  q, k, v = _inputs(seed, t, kv, groups, 8)
  q, k = 3 * q, 3 * k
  sizes = Sizes(n_start, window, chunk, 16)
  spec, (naive_method, params) = case.make(sizes), case.naive(sizes)
  positions = np.arange(t) + offset
  expected, _ = naive_attention(q, k, v, positions, default_inv_freq(8), naive_method, softcap=2.0, **params)
  ours = _attend(q, k, v, positions, Rotary(jnp.asarray(default_inv_freq(8)), 2.0), spec)
  np.testing.assert_allclose(ours, expected, atol=2e-5)


@pytest.mark.parametrize("layer", [3, 4])
@pytest.mark.parametrize("t, top_k, softcap", [(90, 5, None), (90, 200, None), (40, 5, 1.5), (25, 3, None)])
def test_lambda_top_k_alibi_matches_naive(layer, t, top_k, softcap):
  """Lambda's top_k middle keys under ALiBi: chosen by q.k (their bias, of distance insert_at, is
  the same for all) and seen with that bias, from layer top_k_from_layer on; at offset 10^8 too."""
  q, k, v = _inputs(t + layer, t, 2, 2, 16)
  slopes = alibi_slopes(4)
  spec = resolve(Lambda(n_global=4, n_local=16, top_k=top_k, top_k_from_layer=4, top_k_insert_at=24, chunk=7,
                        key_block=9), 1)
  expected, _ = naive_attention(q, k, v, None, None, "lambda", alibi_slopes=slopes, softcap=softcap, n_global=4,
                                n_local=16, top_k=top_k, top_k_from_layer=4, insert_at=24, layer=layer)
  args = [jnp.asarray(x)[None] for x in (q, k, v, np.arange(t) + 10**8)]
  ours = np.asarray(attend(*args, ALiBi(jnp.asarray(slopes), softcap), spec, layer=layer)[0])
  np.testing.assert_allclose(ours, expected, atol=2e-5)


@pytest.mark.parametrize("n_local, chunk", [(64, 16), (12, 8)])
def test_infllm_alibi(n_local, chunk):
  """InfLLM with ALiBi: with no far keys it is dense; with far keys its far branch has the bias of
  distance n_local - 1, so moving every far key's bias to that distance and every other to its
  true one gives dense with those distances: checked on an input where it retrieves every block
  (top_k >= blocks), so its keys are every key."""
  t, kv, groups, h = 48, 2, 2, 8
  q, k, v = _inputs(5, t, kv, groups, h)
  slopes = alibi_slopes(kv * groups)
  spec = InfLLM(n_init=4, n_local=n_local, block_size=4, repr_tokens=2, top_k=64, chunk=chunk)
  ours = _attend(q, k, v, np.arange(t) + 10**8, ALiBi(jnp.asarray(slopes)), spec)
  # The reference: every key seen; far keys (i-j >= n_local) at distance n_local - 1.
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  dist = np.where(i - j >= n_local, n_local - 1, i - j)
  qg = q.reshape(t, kv, groups, h)
  logits = np.einsum("ikgh,jkh->kgij", qg.astype(np.float64), k) / np.sqrt(h)
  logits -= slopes.reshape(kv, groups)[:, :, None, None] * dist
  logits = np.where(j <= i, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum("kgij,jkh->ikgh", p / p.sum(-1, keepdims=True), v).reshape(t, kv * groups, h)
  np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_splash_soft_caps_and_alibi_takes_xla():
  """Splash (interpret mode) caps logits as the XLA path does; a kernel asked for by name with
  ALiBi is refused in one line, and `auto` runs ALiBi through XLA."""
  q, k, v = _inputs(3, 160, 2, 2, 16)
  args = [jnp.asarray(x)[None] for x in (3 * q, 3 * k, v, np.arange(160))]
  spec = resolve(Lambda(n_global=4, n_local=40, chunk=32, key_block=32), 1)
  capped = Rotary(jnp.asarray(default_inv_freq(16)), 1.5)
  o_kernel, _ = spec.kernel_attend(Splash(interpret=True), *args, capped)
  expected, _ = naive_attention(3 * q, 3 * k, v, np.arange(160), default_inv_freq(16), "lambda", softcap=1.5,
                                n_global=4, n_local=40)
  np.testing.assert_allclose(np.asarray(o_kernel[0]), expected, atol=2e-5)
  uncapped, _ = naive_attention(3 * q, 3 * k, v, np.arange(160), default_inv_freq(16), "lambda", n_global=4,
                                n_local=40)
  assert np.abs(uncapped - expected).max() > 1e-2  # (the cap matters here)
  alibi = ALiBi(jnp.asarray(alibi_slopes(4)))
  with pytest.raises(UserError, match="no ALiBi"):
    attend(*args, alibi, resolve(Dense(kernel="splash"), 1))
  np.testing.assert_allclose(np.asarray(attend(*args, alibi, resolve(Dense(kernel="auto"), 1))[0]),
                             naive_attention(q * 3, k * 3, v, None, None, "dense", alibi_slopes=alibi_slopes(4))[0],
                             atol=2e-5)
