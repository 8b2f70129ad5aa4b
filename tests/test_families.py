"""Every method on the model families whose attention differs from Llama's: MPT (ALiBi instead of
RoPE), Gemma 2 (soft-capped logits, a sliding window on every other layer, the method on the
rest) and Gemma 3 (windows on 5 of 6 layers, with their own RoPE theta; q/k norms): chunked caches and token-by-token decoding equal the one-shot forward, streams at offset
10^8 equal those at 0, and a per-layer model's layers attend as their kind says (against the
naive reference). Parity with transformers: test_parity.py, test_mpt.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import feed_cached
from methods.cases import BY_NAME, Path, model_spec, with_path
from naive_attention import default_inv_freq, naive_attention
from test_attention import _inputs

from lminf_jax.attention import InfLLM, Lambda, Rotary, attend, resolve
from lminf_jax.attention.per_layer import PerLayer
from lminf_jax.cache import init_cache
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import cached_token_nll, forward, token_nll
from lminf_jax.loading import load
from lminf_jax.models.config import LlamaConfig

TOKENS = np.random.default_rng(1).integers(0, 97, size=(2, 90))


@pytest.fixture(scope="module", params=["mpt", "gemma2", "gemma3_text"])
def family(request, tmp_path_factory):
  """(config, params) of a tiny random model of the family (windows of 8: gemma2 on layers 0 and 2,
  gemma3_text on 0-4)."""
  from helpers import tiny_hf_model

  out = tmp_path_factory.mktemp(request.param) / "hf"
  tiny_hf_model(request.param).save_pretrained(out)
  config, params, _ = load(out)
  return config, params


@pytest.mark.parametrize("case", with_path(Path.CACHED) + with_path(Path.OWN_CHUNKS), ids=repr)
def test_every_method_cached_and_decoded_equals_one_shot(family, case):
  """Chunked cached NLL and token-by-token decoding (after a 30-token prefill) equal the one-shot
  forward, with windows (20 and 3 starting tokens; the Gemmas' 8) far shorter than the 90 tokens."""
  config, params = family
  spec = config.resolve_attention(model_spec(case, 16))
  tokens = jnp.asarray(TOKENS)
  expected_nll = np.asarray(token_nll(params, config, tokens, attention=spec))
  np.testing.assert_allclose(np.asarray(cached_token_nll(params, config, tokens, attention=spec, chunk=16)),
                             expected_nll, atol=1e-4)
  positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), tokens.shape)
  expected = np.asarray(forward(params, config, tokens, attention=spec))
  chunks = [32] + [16] * 3 + [10] if case.supports(Path.OWN_CHUNKS) else [30] + [1] * 60  # (infllm: its own chunks)
  got = feed_cached(params, config, spec, tokens, positions, chunks, max_len=90)
  np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["lambda", "streaming", "infllm"])
def test_stream_at_offset_1e8_equals_offset_0(family, method):
  config, params = family
  spec = config.resolve_attention(model_spec(BY_NAME[method], 16))
  chunks = [16] * 5 + [10] if method == "infllm" else [30] + [1] * 60
  run = lambda offset: feed_cached(params, config, spec, jnp.asarray(TOKENS), jnp.broadcast_to(  # noqa: E731
      jnp.arange(90, dtype=jnp.int32) + offset, TOKENS.shape), chunks, max_len=90)
  np.testing.assert_allclose(run(10**8), run(0), atol=1e-4)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_per_layer_attends_its_window_or_the_method(layer):
  """A windowed layer is a sliding window of its keys whatever the method; a global layer runs
  the method (here lambda, with soft-capping): each against the naive reference."""
  t, window = 50, 8
  q, k, v = _inputs(layer, t, 2, 2, 16)
  q, k = 3 * q, 3 * k
  spec = PerLayer(resolve(Lambda(n_global=3, n_local=20, chunk=16, key_block=8), 1), window, (True, False, True))
  pe = Rotary(jnp.asarray(default_inv_freq(16)), 2.0)
  ours = np.asarray(attend(*(jnp.asarray(x)[None] for x in (q, k, v, np.arange(t))), pe, spec, jnp.int32(layer))[0])
  params = dict(n_global=0, n_local=window) if spec.windowed[layer] else dict(n_global=3, n_local=20)
  expected, _ = naive_attention(q, k, v, np.arange(t), default_inv_freq(16), "lambda", softcap=2.0, **params)
  np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_a_ring_shorter_than_the_window_is_refused():
  """InfLLM's ring (n_local + block_size) must hold the windowed layers' keys."""
  config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                       head_dim=16, sliding_window=8, window_layers=(True, False))
  with pytest.raises(UserError, match="shorter than the model's sliding window"):
    init_cache(config, InfLLM(n_init=2, n_local=4, block_size=2, repr_tokens=1, chunk=4), 1, max_len=64)
  init_cache(config, InfLLM(n_init=2, n_local=6, block_size=2, repr_tokens=1, chunk=4), 1, max_len=64)
