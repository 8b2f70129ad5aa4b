"""Fixed-size caches: chunked and token-by-token feeding equal the one-shot forward (every method's:
tests/methods/test_contract.py), left padding, positions at 1e8 and with gaps, capacity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import feed_cached, run_cli
from methods.cases import BY_NAME, model_spec

from lminf_jax.attention import Dense, InfLLM, Lambda, Streaming, resolve
from lminf_jax.cache import init_cache
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import forward, forward_cached
from lminf_jax.inference.generation import Sampling, decode
from lminf_jax.inference.stream import stream_nll

@pytest.fixture(scope="module")
def model(tiny_model):
  return tiny_model


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 90)), jnp.int32)


def test_left_padded_batch_equals_each_row_alone(model):
  config, params, _ = model
  spec = resolve(model_spec(BY_NAME["lambda"], 8), config.max_position_embeddings)
  pad = 11
  row = TOKENS[1, :60]
  tokens = jnp.stack([jnp.concatenate([jnp.zeros(pad, jnp.int32), row[:60 - pad]]), row])
  positions = jnp.stack([jnp.arange(60) - pad, jnp.arange(60)]).astype(jnp.int32)
  cache = init_cache(config, spec, 2)
  outs = []
  for start in range(0, 60, 8):
    logits, cache = forward_cached(params, config, cache, tokens[:, start:start + 8], positions[:, start:start + 8],
                                   spec)
    outs.append(np.asarray(logits))
  got = np.concatenate(outs, axis=1)
  alone = np.asarray(forward(params, config, row[None, :60 - pad], attention=spec))[0]
  np.testing.assert_allclose(got[0, pad:], alone, atol=1e-4)
  np.testing.assert_allclose(got[1], np.asarray(forward(params, config, row[None], attention=spec))[0], atol=1e-4)


@pytest.mark.parametrize("chunks", [[10] * 9, [30] + [1] * 60], ids=["chunked", "decode"])
@pytest.mark.parametrize("method", ["lambda", "streaming"])
def test_stream_at_position_offset_1e8_equals_offset_0(model, method, chunks):
  config, params, _ = model
  spec = resolve(model_spec(BY_NAME[method], 10), config.max_position_embeddings)
  run = lambda offset: feed_cached(params, config, spec, TOKENS, jnp.broadcast_to(  # noqa: E731
      jnp.arange(90, dtype=jnp.int32) + offset, TOKENS.shape), chunks)
  np.testing.assert_allclose(run(10**8), run(0), atol=1e-4)


@pytest.mark.parametrize("method", ["lambda", "streaming", "dense"])
def test_decode_with_position_gaps_equals_one_shot(model, method):
  """Positions that jump (by more than the ring) inside the window: decoding must still match."""
  config, params, _ = model
  spec = resolve(model_spec(BY_NAME[method], 16), config.max_position_embeddings)
  positions = jnp.broadcast_to(jnp.asarray(np.r_[0:40, 1040:1060, 5060:5090], jnp.int32), TOKENS.shape)
  expected = np.asarray(forward(params, config, TOKENS, positions, attention=spec))
  got = feed_cached(params, config, spec, TOKENS, positions, [30] + [1] * 60, max_len=90)
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cache_size_does_not_grow(model):
  config, params, _ = model
  spec = resolve(model_spec(BY_NAME["lambda"], 8), config.max_position_embeddings)
  cache = init_cache(config, spec, 2)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
  size = sum(x.nbytes for x in jax.tree.leaves(cache))
  long = jnp.tile(TOKENS, (1, 10))  # 900 tokens, 45x the window
  for start in range(0, long.shape[1], 100):
    positions = jnp.broadcast_to(jnp.arange(start, start + 100, dtype=jnp.int32), (2, 100))
    _, cache = forward_cached(params, config, cache, long[:, start:start + 100], positions, spec)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == shapes
  assert sum(x.nbytes for x in jax.tree.leaves(cache)) == size
  assert np.asarray(cache.next_idx).tolist() == [900, 900]


def test_feeding_past_a_dense_cache_is_an_error_and_leaves_it_usable(model):
  """A dense cache of 40 takes 40 tokens; more (which would wrap it into a sliding window) is
  refused by forward_cached, decode and stream_nll before anything is written or donated."""
  config, params, _ = model
  spec = resolve(model_spec(BY_NAME["dense"], 8), config.max_position_embeddings)
  positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), TOKENS.shape)
  expected = np.asarray(forward(params, config, TOKENS[:, :40], attention=spec))
  cache = init_cache(config, spec, 2, max_len=40)
  _, cache = forward_cached(params, config, cache, TOKENS[:, :39], positions[:, :39], spec)
  with pytest.raises(UserError, match="dense cache full: it holds 40 tokens, but this call needs 41"):
    forward_cached(params, config, cache, TOKENS[:, 39:41], positions[:, 39:41], spec)
  with pytest.raises(UserError, match="needs 41"):
    decode(params, config, cache, jnp.zeros((2, config.vocab_size)), positions[:, 39], jax.random.PRNGKey(0), spec,
           Sampling(), 2, ())
  logits, cache = forward_cached(params, config, cache, TOKENS[:, 39:40], positions[:, 39:40], spec)
  np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, 39], atol=1e-4)
  with pytest.raises(UserError, match="dense cache full: it holds 40 tokens, but this call needs 41"):
    stream_nll(params, config, init_cache(config, spec, 1, max_len=40), iter([np.zeros(41, np.int32)]), 41, spec, 41)


@pytest.mark.parametrize("gaps", [False, True], ids=["consecutive", "position_gaps"])
@pytest.mark.parametrize("method", ["lambda", "streaming"])
def test_ring_shorter_than_window_for_a_short_stream(model, method, gaps):
  """Given max_len below the window, the ring holds max_len tokens (a decode step reads only
  those), the logits still equal the one-shot forward, and one token more is refused."""
  config, params, _ = model
  spec = {"lambda": Lambda(n_global=3, n_local=128, chunk=8, key_block=8),
          "streaming": Streaming(n_sink=2, n_recent=128, chunk=8, key_block=8)}[method]
  spec = resolve(spec, config.max_position_embeddings)
  steps = np.r_[0:40, 1040:1060, 5060:5090] if gaps else np.arange(90)
  positions = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), TOKENS.shape)
  expected = np.asarray(forward(params, config, TOKENS, positions, attention=spec))
  cache = init_cache(config, spec, 2, max_len=90)
  assert cache.kv.ring_k.shape[3] == 90 and init_cache(config, spec, 2).kv.ring_k.shape[3] == 128
  logits, start = [], 0
  for size in [30] + [1] * 11 + [7] * 7:
    out, cache = forward_cached(params, config, cache, TOKENS[:, start:start + size], positions[:, start:start + size],
                                spec)
    logits.append(np.asarray(out))
    start += size
  np.testing.assert_allclose(np.concatenate(logits, axis=1), expected, atol=1e-4)
  with pytest.raises(UserError, match=f"{method} cache full: it holds 90 tokens, but this call needs 91"):
    forward_cached(params, config, cache, TOKENS[:, :1], positions[:, -1:] + 1, spec)


CAPACITY = 42  # init_cache's max_len for each of these caches, which must neither wrap nor drop a block
BOUNDED = {
    "dense": Dense(chunk=8, key_block=8),
    "lambda_short_ring": Lambda(n_global=3, n_local=128, chunk=8, key_block=8),
    "streaming_short_ring": Streaming(n_sink=2, n_recent=128, chunk=8, key_block=8),
    # a pool of (42 - 1 - 2 - 8) // 4 = 7 blocks: token 43 would need an 8th
    "infllm_pool": InfLLM(n_init=2, n_local=8, block_size=4, repr_tokens=2, top_k=2, chunk=8, key_block=8),
}


def _feed_under_jit(params, config, spec, tokens, positions, chunks: list[int]) -> list[np.ndarray]:
  """Logits of each chunk fed through a fresh cache of CAPACITY by forward_cached under the
  caller's jit (where check_room cannot look at the cache)."""
  step = jax.jit(forward_cached, static_argnames=("config", "attention"))
  cache = init_cache(config, spec, tokens.shape[0], max_len=CAPACITY)
  outs, start = [], 0
  for size in chunks:
    logits, cache = step(params, config, cache, tokens[:, start:start + size], positions[:, start:start + size], spec)
    outs.append(np.asarray(logits))
    start += size
  return outs


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_under_jit_a_full_cache_gives_nan_from_then_on(model, method):
  """Under jit, the CAPACITY tokens a cache holds get the one-shot logits; the call that would
  overflow it and every later one get NaN, never logits of a cache that wrapped or lost a block."""
  config, params, _ = model
  spec = resolve(BOUNDED[method], config.max_position_embeddings)
  positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), TOKENS.shape)
  outs = _feed_under_jit(params, config, spec, TOKENS, positions, [8] * 5 + [2, 1, 8])
  expected = np.asarray(forward(params, config, TOKENS[:, :CAPACITY], attention=spec))
  np.testing.assert_allclose(np.concatenate(outs[:6], axis=1), expected, atol=1e-4)
  assert np.isnan(outs[6]).all() and np.isnan(outs[7]).all()


@pytest.mark.parametrize("method", ["dense", "lambda_short_ring"])
def test_under_jit_only_the_rows_that_overflow_get_nan(model, method):
  """Row 0, left-padded by 6, fills the cache 6 tokens after row 1: until then its logits are
  the one-shot ones, while row 1's are NaN."""
  config, params, _ = model
  spec = resolve(BOUNDED[method], config.max_position_embeddings)
  pad, tokens = 6, TOKENS[:, :50]
  positions = jnp.stack([jnp.arange(50) - pad, jnp.arange(50)]).astype(jnp.int32)
  got = np.concatenate(_feed_under_jit(params, config, spec, tokens, positions, [16, 16, 10, 4, 4]), axis=1)
  np.testing.assert_allclose(got[1, :CAPACITY], np.asarray(forward(params, config, tokens[1:, :CAPACITY],
                                                                   attention=spec))[0], atol=1e-4)
  assert np.isnan(got[1, CAPACITY:]).all()
  np.testing.assert_allclose(got[0, pad:46], np.asarray(forward(params, config, tokens[:1, pad:46],
                                                                attention=spec))[0], atol=1e-4)
  assert np.isnan(got[0, 46:]).all()


def test_cli_nll_cached_equals_one_shot(model, tmp_path, capsys):
  _, _, ckpt = model
  np.save(tmp_path / "tokens.npy", np.asarray(TOKENS[0]))
  common = ("nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "lambda", "--n-local", "20",
            "--n-global", "3")
  assert run_cli(capsys, *common, "--out", tmp_path / "a.npy")[0] == 0
  assert run_cli(capsys, *common, "--out", tmp_path / "b.npy", "--cached", "--chunk", "13")[0] == 0
  np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"), atol=1e-4)
