"""Every method on the model families whose attention differs from Llama's: MPT (ALiBi instead of
RoPE), Gemma 2 (soft-capped logits, a sliding window on every other layer, the method on the
rest) and Gemma 3 (windows on 5 of 6 layers, with their own RoPE theta; q/k norms): chunked caches and token-by-token decoding equal the one-shot forward, streams at offset
10^8 equal those at 0, and a per-layer model's layers attend as their kind says (against the
naive reference), each kind keeping a cache of its own (the windowed layers a ring of the window). Parity with transformers: test_parity.py, test_mpt.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SLOW, feed_cached
from methods.cases import BY_NAME, Path, model_spec, with_path
from naive_attention import default_inv_freq, naive_attention
from test_attention import _inputs

from lminf_jax.attention import InfLLM, Lambda, Rotary, SlidingWindow, attend, resolve
from lminf_jax.attention.per_layer import PerLayer
from lminf_jax.cache import init_cache
from lminf_jax.inference.forward import cached_token_nll, forward, token_nll
from lminf_jax.inference.generation import Sampling, decode, generate, left_pad, prefill
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


# In CI every method but the variants runs on gemma3_text (windowed and global layers, each with its RoPE) and
# these on the other families; LMINF_SLOW=1 runs every method on every family (scripts/slow_tests.sh).
CI_METHODS = ("dense", "lambda", "infllm")
VARIANTS = ("lambda_no_limit", "infllm_offload", "dca_mscale", "dilated")  # (cached as their base method)


@pytest.mark.parametrize("case", with_path(Path.CACHED) + with_path(Path.OWN_CHUNKS), ids=repr)
def test_every_method_cached_and_decoded_equals_one_shot(family, case):
  """Chunked cached NLL and token-by-token decoding (after a 30-token prefill) equal the one-shot
  forward, with windows (20 and 3 starting tokens; the Gemmas' 8) far shorter than the 90 tokens."""
  config, params = family
  if not (SLOW or (config.model_type == "gemma3_text" and case.name not in VARIANTS) or case.name in CI_METHODS):
    pytest.skip("slow: runs with LMINF_SLOW=1 (scripts/slow_tests.sh)")
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


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text", "qwen2_window_layer1"])
def per_layer(request, tmp_path_factory):
  """(config, params) of a tiny random model with windowed and global layers (windows of 8: gemma2's
  layers 0 and 2, gemma3_text's 0-4 of 6, qwen2_window_layer1's layer 1 of 2)."""
  from helpers import tiny_hf_model

  out = tmp_path_factory.mktemp(request.param) / "hf"
  tiny_hf_model(request.param).save_pretrained(out)
  config, params, _ = load(out)
  assert config.sliding_window == 8 and any(config.window_layers) and not all(config.window_layers)
  return config, params


# (The global layers' layout for 90 tokens: dense a ring of them, lambda and streaming 3 slots and a
# ring of 20, infllm 3 slots and a ring of 20 + 4 with its own arrays; see `model_spec`.)
GLOBAL_LAYOUT = {"dense": (0, 90), "lambda": (3, 20), "streaming": (3, 20), "infllm": (3, 24)}


@pytest.mark.parametrize("method", list(GLOBAL_LAYOUT))
def test_each_layer_kind_keeps_a_cache_of_its_own(per_layer, method):
  """The windowed layers keep a ring of the window (8) alone, however long max_len is (at most
  max_len): no starting slots and none of infllm's arrays; the global layers keep the method's
  slots, ring and arrays."""
  config, _ = per_layer
  spec = config.resolve_attention(model_spec(BY_NAME[method], 16))
  n_windowed = sum(config.window_layers)
  n_global = config.num_layers - n_windowed
  cache = init_cache(config, spec, 2, max_len=90)
  windowed = cache.windowed
  assert windowed.kv.ring_k.shape == windowed.kv.ring_v.shape == (n_windowed, 2, config.num_kv_heads, 8,
                                                                  config.head_dim)
  assert windowed.kv.slot_k.shape[3] == 0 and windowed.kv.extra == () and windowed.shared == ()
  assert windowed.ring_idx.shape == (2, 8) and windowed.slot_idx.shape == (2, 0)
  slots, ring = GLOBAL_LAYOUT[method]
  assert cache.kv.slot_k.shape == (n_global, 2, config.num_kv_heads, slots, config.head_dim)
  assert cache.kv.ring_k.shape == (n_global, 2, config.num_kv_heads, ring, config.head_dim)
  assert cache.ring_idx.shape == (2, ring)
  extra = jax.tree.leaves(cache.kv.extra)
  # (infllm: its 5 arrays and the 5 of its device blocks, `Held`, which hold no block without offload)
  assert (len(extra) == 10) == (method == "infllm") and all(x.shape[0] == n_global for x in extra)
  if method != "dense":  # (dense without max_len: refused)
    longer = init_cache(config, spec, 2, max_len=900)
    assert jax.tree.map(jnp.shape, longer.windowed) == jax.tree.map(jnp.shape, windowed)
  assert init_cache(config, spec, 2, max_len=5).windowed.kv.ring_k.shape[3] == 5


@pytest.mark.parametrize("method", list(GLOBAL_LAYOUT))
def test_greedy_generation_past_the_window_picks_the_one_shot_argmax(per_layer, method):
  """30 tokens generated after a 12-token prompt (windows of 8, the windowed rings wrapping several
  times; the decode loop runs each layer on its kind's cache): each is the argmax of the one-shot
  forward over the tokens before it. Continued (`decode` on `Decoded.cache`, stacked back per
  kind; infllm), 10 then 20 tokens are the 30. (infllm retrieves every block here, top_k 16: a decode step
  retrieves per token, the one-shot forward per chunk.)"""
  config, params = per_layer
  if method == "infllm" and config.model_type != "gemma3_text" and not SLOW:  # (CI: infllm on one family)
    pytest.skip("slow: runs with LMINF_SLOW=1 (scripts/slow_tests.sh)")
  spec = model_spec(BY_NAME[method], 4)
  spec = config.resolve_attention(dataclasses.replace(spec, top_k=16) if method == "infllm" else spec)
  prompt = TOKENS[0, :12].tolist()
  out = generate(params, config, [prompt], 30, attention=spec, eos_ids=(), chunk=4)[0]
  logits = forward(params, config, jnp.asarray([prompt + out]), attention=spec)
  np.testing.assert_array_equal(np.asarray(logits[0, len(prompt) - 1:-1]).argmax(-1), out)
  if method != "infllm":  # (stacking back is the same for every method: infllm's, with its own arrays)
    return
  cache = init_cache(config, spec, 1, max_len=42)
  tokens, positions = left_pad([prompt], 4)
  last, cache = prefill(params, config, cache, jnp.asarray(tokens), jnp.asarray(positions), spec, 4)
  first = decode(params, config, cache, last, jnp.asarray([12]), jax.random.PRNGKey(0), spec, Sampling(), 10, ())
  second = decode(params, config, first.cache, first.logits_bv, first.next_pos_b, jax.random.PRNGKey(0), spec,
                  Sampling(), 20, ())
  assert np.asarray(first.tokens_bn)[0].tolist() + np.asarray(second.tokens_bn)[0].tolist() == out


def test_a_method_ring_shorter_than_the_window_is_the_global_layers_alone(per_layer):
  """InfLLM's ring (n_local + block_size = 6) is shorter than the windowed layers' 8: they keep a
  ring of their own (was: refused), and the cache fed in its chunks equals the one-shot forward."""
  config, params = per_layer
  spec = config.resolve_attention(InfLLM(n_init=2, n_local=4, block_size=2, repr_tokens=1, top_k=2, chunk=4))
  cache = init_cache(config, spec, 2, max_len=90)
  assert cache.kv.ring_k.shape[3] == 6 and cache.windowed.kv.ring_k.shape[3] == 8
  tokens = jnp.asarray(TOKENS)
  positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), tokens.shape)
  expected = np.asarray(forward(params, config, tokens, attention=spec))
  np.testing.assert_allclose(feed_cached(params, config, spec, tokens, positions, [4] * 22 + [2], max_len=90),
                             expected, atol=1e-4)


def test_every_layer_windowed_is_the_window_alone():
  """window_layers all true: every layer keeps its window whatever the method (no layer runs it)."""
  config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                       head_dim=16, sliding_window=8, window_layers=(True, True))
  spec = config.resolve_attention(Lambda(n_global=3, n_local=20))
  assert spec == SlidingWindow(window=8, chunk=512, key_block=512)
  assert init_cache(config, spec, 1, max_len=64).windowed is None
