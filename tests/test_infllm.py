"""InfLLM against the naive numpy reference (tests/naive_infllm.py, written from docs/semantics.md#infllm alone)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SLOW, feed_cached, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_infllm import infllm_key_sets, memory_state, naive_infllm

from lminf_jax.attention import Dense, InfLLM, Lambda, Rotary, attend, resolve
from lminf_jax.errors import UserError
from lminf_jax.cache import init_cache
from lminf_jax.inference.forward import cached_token_nll, forward, forward_cached, token_nll
from lminf_jax.inference.generation import generate
from lminf_jax.rope import apply_rope


def _inv_freq(h: int) -> np.ndarray:
  return (1.0 / 10000.0 ** (np.arange(0, h, 2) / h)).astype(np.float32)


def _ours(q, k, v, spec, positions=None, inv_freq=None):
  t, h = q.shape[-3], q.shape[-1]
  batched = q.ndim == 4
  q, k, v = (jnp.asarray(x if batched else x[None]) for x in (q, k, v))
  positions = jnp.arange(t)[None] if positions is None else jnp.asarray(positions)
  out = attend(q, k, v, positions, Rotary(jnp.asarray(_inv_freq(h) if inv_freq is None else inv_freq)), resolve(spec, 1))
  return np.asarray(out if batched else out[0])


def _random(seed: int, t: int, kv: int, groups: int, h: int):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((t, kv * groups, h)).astype(np.float32),
          rng.standard_normal((t, kv, h)).astype(np.float32), rng.standard_normal((t, kv, h)).astype(np.float32))


@settings(max_examples=40 if SLOW else 12, deadline=None)
@given(t=st.integers(1, 72), n_init=st.integers(0, 6), n_local=st.integers(1, 16), block_size=st.integers(1, 6),
       repr_frac=st.floats(0, 1), top_k=st.integers(1, 5), chunk=st.integers(1, 20), key_block=st.integers(1, 24),
       kv=st.integers(1, 2), groups=st.sampled_from([1, 3]), h=st.sampled_from([2, 8]), seed=st.integers(0, 2**16))
def test_matches_naive(t, n_init, n_local, block_size, repr_frac, top_k, chunk, key_block, kv, groups, h, seed):
  """Lengths with 0, 1 and many blocks, top_k above and below the block count, chunks that do
  and do not divide the length."""
  repr_tokens = 1 + int(repr_frac * (block_size - 1))
  q, k, v = _random(seed, t, kv, groups, h)
  expected, _ = naive_infllm(q, k, v, _inv_freq(h), n_init, n_local, block_size, repr_tokens, top_k, chunk)
  spec = InfLLM(n_init=n_init, n_local=n_local, block_size=block_size, repr_tokens=repr_tokens, top_k=top_k,
                chunk=chunk, key_block=key_block)
  np.testing.assert_allclose(_ours(q, k, v, spec), expected, atol=1e-5)


@pytest.mark.parametrize("t,top_k,chunk", [(60, 2, 5), (60, 100, 7), (33, 1, 1)])
def test_many_blocks_selected_as_naive(t, top_k, chunk):
  """Cases the naive reference says select among several blocks (so selection is exercised)."""
  q, k, v = _random(t, t, 2, 3, 8)
  expected, selected = naive_infllm(q, k, v, _inv_freq(8), 3, 8, 4, 2, top_k, chunk)
  assert max(len(s) for s in selected) >= min(top_k, 2)
  assert len({tuple(s) for s in selected if s}) > 1
  spec = InfLLM(n_init=3, n_local=8, block_size=4, repr_tokens=2, top_k=top_k, chunk=chunk, key_block=5)
  np.testing.assert_allclose(_ours(q, k, v, spec), expected, atol=1e-5)


def test_exact_partition_on_the_masks():
  """With all logits 0 and one-hot values, output[i] = (multiplicity of key j) / (keys seen): every
  key is counted at most once, and the attended set is exactly local + far of the reference."""
  t, n_init, n_local, bs, chunk = 48, 3, 8, 4, 5
  q = np.zeros((t, 2, t), np.float32)
  k = np.random.default_rng(0).standard_normal((t, 1, t)).astype(np.float32)
  v = np.eye(t, dtype=np.float32)[:, None, :]
  spec = InfLLM(n_init=n_init, n_local=n_local, block_size=bs, repr_tokens=2, top_k=2, chunk=chunk, key_block=8)
  out = _ours(q, k, v, spec)[:, 0]  # [T, T]: query i's weight on key j
  _, selected = naive_infllm(q, k, v, _inv_freq(t), n_init, n_local, bs, 2, 2, chunk)
  for i, (local, far) in enumerate(infllm_key_sets(t, selected, n_init, n_local, bs, chunk)):
    assert not local & far
    seen = out[i] > 0
    np.testing.assert_allclose(out[i][seen], 1 / seen.sum(), rtol=1e-5)  # no key twice
    assert set(np.flatnonzero(seen)) == local | far, i
    # Blocks formed before the query's chunk are all-or-nothing, and at most top_k are in.
    _, blocks = memory_state(i // chunk * chunk, n_init, n_local, bs)
    in_blocks = [seen[b].all() for b in blocks]
    assert all(seen[b].all() or not seen[b].any() for b in blocks)
    assert sum(in_blocks) == min(2, len(blocks))


def test_planted_key_far_outside_the_window_is_retrieved():
  """A block whose keys match the last chunk's (rotated) queries, far outside the window, is
  selected: its marker values dominate the output. Lambda (no memory) does not see it."""
  t, h, n_local, bs, chunk = 256, 16, 32, 8, 16
  rng = np.random.default_rng(1)
  q = 0.1 * rng.standard_normal((t, 3, h)).astype(np.float32)
  k = 0.1 * rng.standard_normal((t, 1, h)).astype(np.float32)
  v = np.zeros((t, 1, h), np.float32)
  u = rng.standard_normal(h).astype(np.float32)
  u /= np.linalg.norm(u)
  planted = slice(4 + 5 * bs, 4 + 6 * bs)  # block 5 of many, ~200 tokens before the last chunk
  k[planted] = 6 * u
  v[planted] = 1.0
  # Queries whose rotation at n_local-1 is 6u: R_{-(n_local-1)} 6u.
  q[-chunk:] = np.asarray(apply_rope(jnp.asarray(6 * u), jnp.asarray(-(n_local - 1)), jnp.asarray(_inv_freq(h))))
  spec = InfLLM(n_init=4, n_local=n_local, block_size=bs, repr_tokens=2, top_k=1, chunk=chunk, key_block=16)
  out = _ours(q, k, v, spec)
  assert out[-chunk:].min() > 0.9
  _, selected = naive_infllm(q, k, v, _inv_freq(h), 4, n_local, bs, 2, 1, chunk)
  assert selected[-1] == [5]
  window_only = _ours(q, k, v, Lambda(n_global=4, n_local=n_local, chunk=chunk, key_block=16))
  assert np.abs(window_only[-chunk:]).max() < 1e-3


def test_left_padded_batch_equals_each_row_alone():
  q, k, v = _random(3, 50, 1, 3, 8)
  spec = InfLLM(n_init=2, n_local=6, block_size=3, repr_tokens=2, top_k=2, chunk=4, key_block=5)
  pad = 13
  shift = lambda x: np.concatenate([np.zeros_like(x[:pad]), x[:-pad]])  # noqa: E731
  batch = [np.stack([shift(x), x]) for x in (q, k, v)]
  positions = np.stack([np.arange(50) - pad, np.arange(50)])
  got = _ours(*batch, spec, positions=positions)
  np.testing.assert_allclose(got[1], _ours(q, k, v, spec), atol=1e-5)
  np.testing.assert_allclose(got[0, pad:], _ours(q[:-pad], k[:-pad], v[:-pad], spec), atol=1e-5)


def test_full_pool_is_a_clear_error():
  q, k, v = _random(0, 60, 1, 1, 8)
  with pytest.raises(UserError, match=r"capacity_blocks=2, but 60 tokens need \d+ blocks"):
    _ours(q, k, v, InfLLM(n_init=2, n_local=8, block_size=4, capacity_blocks=2, chunk=8))


def _feed_layer(spec, q, k, v, inv_freq_ch: np.ndarray, max_len: int) -> np.ndarray:
  """One layer's attention output [T, N, H] of q [T, N, H], k and v [T, K, H] fed through an
  infllm cache in chunks of spec.chunk, chunk c rotating with its own frequencies inv_freq_ch[c]."""
  import jax

  from lminf_jax.cache import CachedInput, attend_cached, chunk_indices, write
  from models.config import LlamaConfig

  (t, n, h), kv = q.shape, k.shape[1]
  config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=n,
                       num_kv_heads=kv, head_dim=h)

  @jax.jit
  def step(cache, q_bcnh, k_bckh, v_bckh, pos, inv_freq):
    pe, idx = Rotary(inv_freq), chunk_indices(cache.next_idx, pos)
    layer = CachedInput(jax.tree.map(lambda x: x[0], cache.kv), cache._replace(kv=None), idx)
    out, aux = attend_cached(q_bcnh, k_bckh, v_bckh, pos, layer, pe, spec, jnp.int32(0))
    return out[0], write(cache, k_bckh[None], v_bckh[None], jax.tree.map(lambda x: x[None], aux), pos, idx, pe, spec)

  cache, outs = init_cache(config, spec, 1, max_len=max_len), []
  for c, s in enumerate(range(0, t, spec.chunk)):
    e = min(s + spec.chunk, t)
    out, cache = step(cache, *(jnp.asarray(x[None, s:e]) for x in (q, k, v)), jnp.arange(s, e)[None],
                      jnp.asarray(inv_freq_ch[c]))
    outs.append(np.asarray(out))
  return np.concatenate(outs)


def test_cached_chunks_read_every_key_with_their_own_frequencies():
  """RoPE frequencies that change with the call (dynamic NTK past the training length): a chunk
  fed through an infllm cache rotates its queries, its ring's keys and its blocks' (all kept before
  RoPE) with its own frequencies, and the blocks' representative keys come from the probabilities
  each earlier chunk computed with its own (docs/caches.md#rope-scaling-through-a-cache): the naive
  reference with each chunk's frequencies, over 0, 1 and several selected blocks."""
  t, chunk = 45, 6
  q, k, v = _random(7, t, 2, 3, 8)
  growth = 1.0 + np.arange(-(-t // chunk))[:, None] / 3  # (as dynamic NTK's base grows with the length)
  inv_freq_ch = (_inv_freq(8)[None] / growth ** (np.arange(4)[None] / 3)).astype(np.float32)
  spec = InfLLM(n_init=2, n_local=8, block_size=4, repr_tokens=2, top_k=2, chunk=chunk, key_block=5)
  got = _feed_layer(spec, q, k, v, inv_freq_ch, max_len=t)
  expected, selected = naive_infllm(q, k, v, inv_freq_ch, 2, 8, 4, 2, 2, chunk)
  assert len({tuple(s) for s in selected}) > 2  # (selection is exercised)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  written, _ = naive_infllm(q, k, v, inv_freq_ch[0], 2, 8, 4, 2, 2, chunk)  # (with the first chunk's alone)
  assert np.abs(got[chunk:] - written[chunk:]).max() > 1e-3  # (the frequencies are seen)


def test_decoded_tokens_read_their_ring_from_its_anchors():
  """Decoding (a chunk of one token per call, each with its own frequencies, as dynamic NTK past the
  length): the local keys come from the ring's copy rotated when written (by position mod W, W =
  n_local + block_size, with the writer's frequencies; the rest with the reader's), the blocks and
  pending keys before RoPE: the naive reference with that ring."""
  t = 40
  q, k, v = _random(8, t, 1, 3, 8)
  inv_freq_t = (_inv_freq(8)[None] / (1.0 + np.arange(t)[:, None] / 10) ** (np.arange(4)[None] / 3)).astype(np.float32)
  spec = InfLLM(n_init=2, n_local=8, block_size=4, repr_tokens=2, top_k=2, chunk=1, key_block=5)
  got = _feed_layer(spec, q, k, v, inv_freq_t, max_len=t)
  expected, selected = naive_infllm(q, k, v, inv_freq_t, 2, 8, 4, 2, 2, 1, decode_ring=12)
  assert len({tuple(s) for s in selected}) > 2
  np.testing.assert_allclose(got, expected, atol=1e-5)
  fresh, _ = naive_infllm(q, k, v, inv_freq_t, 2, 8, 4, 2, 2, 1)  # (every key with the reader's frequencies)
  assert np.abs(got - fresh).max() > 1e-3


def _double_counted(t, selected, n_init, n_local, block_size, chunk) -> int:
  """How many (query, key) pairs the released rule counts in both branches."""
  sets = infllm_key_sets(t, selected, n_init, n_local, block_size, chunk, released_prefill=True)
  return sum(len(local & far) for local, far in sets)


@settings(max_examples=30 if SLOW else 10, deadline=None)
@given(t=st.integers(1, 72), n_init=st.integers(0, 6), n_local=st.integers(1, 16), block_size=st.integers(1, 6),
       repr_frac=st.floats(0, 1), top_k=st.integers(1, 5), chunk_frac=st.floats(0, 1), key_block=st.integers(1, 24),
       kv=st.integers(1, 2), groups=st.sampled_from([1, 3]), h=st.sampled_from([2, 8]), seed=st.integers(0, 2**16))
def test_released_prefill_matches_naive(t, n_init, n_local, block_size, repr_frac, top_k, chunk_frac, key_block, kv,
                                        groups, h, seed):
  """released_prefill against the naive reference's literal released rule (chunk <= n_local)."""
  repr_tokens = 1 + int(repr_frac * (block_size - 1))
  chunk = 1 + int(chunk_frac * (n_local - 1))
  q, k, v = _random(seed, t, kv, groups, h)
  expected, _ = naive_infllm(q, k, v, _inv_freq(h), n_init, n_local, block_size, repr_tokens, top_k, chunk,
                             released_prefill=True)
  spec = InfLLM(n_init=n_init, n_local=n_local, block_size=block_size, repr_tokens=repr_tokens, top_k=top_k,
                chunk=chunk, key_block=key_block, released_prefill=True)
  np.testing.assert_allclose(_ours(q, k, v, spec), expected, atol=1e-5)


# (t, n_init, n_local, block_size, top_k, chunk): blocks selected among several, chunk = n_local, a partial last chunk
RELEASED_CASES = [(60, 3, 8, 4, 2, 5), (60, 3, 8, 4, 2, 8), (61, 2, 6, 3, 1, 4), (40, 0, 5, 2, 100, 3)]


@pytest.mark.parametrize("t,n_init,n_local,bs,top_k,chunk", RELEASED_CASES)
def test_released_prefill_double_counts_as_naive(t, n_init, n_local, bs, top_k, chunk):
  """Cases where the released rule counts keys twice, and (left-padded by 13) with a partial last chunk."""
  q, k, v = _random(t, t, 2, 3, 8)
  expected, selected = naive_infllm(q, k, v, _inv_freq(8), n_init, n_local, bs, 2, top_k, chunk,
                                    released_prefill=True)
  assert _double_counted(t, selected, n_init, n_local, bs, chunk) > 0
  spec = InfLLM(n_init=n_init, n_local=n_local, block_size=bs, repr_tokens=2, top_k=top_k, chunk=chunk, key_block=5,
                released_prefill=True)
  np.testing.assert_allclose(_ours(q, k, v, spec), expected, atol=1e-5)
  pad = 13
  shift = lambda x: np.concatenate([np.zeros_like(x[:pad]), x[:-pad]])  # noqa: E731
  batch = [np.stack([shift(x), x]) for x in (q, k, v)]
  positions = np.stack([np.arange(t) - pad, np.arange(t)])
  short, _ = naive_infllm(q[:-pad], k[:-pad], v[:-pad], _inv_freq(8), n_init, n_local, bs, 2, top_k, chunk,
                          released_prefill=True)
  got = _ours(*batch, spec, positions=positions)
  np.testing.assert_allclose(got[0, pad:], short, atol=1e-5)
  np.testing.assert_allclose(got[1], expected, atol=1e-5)


def test_released_prefill_changes_chunked_prefill_not_decode():
  """Chunks of 8 (= n_local): the outputs differ where keys count twice; chunks of 1 (decoding): equal."""
  t, n_init, n_local, bs = 60, 3, 8, 4
  q, k, v = _random(5, t, 2, 3, 8)
  base = dict(n_init=n_init, n_local=n_local, block_size=bs, repr_tokens=2, top_k=2, key_block=5)
  for chunk in (8, 1):
    paper, released = (_ours(q, k, v, InfLLM(**base, chunk=chunk, released_prefill=flag)) for flag in (False, True))
    if chunk == 1:
      np.testing.assert_allclose(released, paper, atol=1e-6)
    else:
      diff = np.abs(released - paper).max(axis=(1, 2))
      # Equal where the rules agree: chunk 0 (no far key) and the last query of chunks 1 and 2 (before
      # selection depends on the representative keys, which the double counting changes).
      assert diff[[*range(chunk), 2 * chunk - 1, 3 * chunk - 1]].max() < 1e-6
      assert diff.max() > 1e-2, diff.max()


def test_released_prefill_refuses_chunks_longer_than_n_local():
  with pytest.raises(UserError, match=r"released_prefill needs chunks of at most n_local \(8\) queries, got 9"):
    InfLLM(n_local=8, chunk=9, released_prefill=True)
  spec = InfLLM(chunk=64, released_prefill=True)  # (n_local from the model)
  assert resolve(spec, 64).chunk == 64
  with pytest.raises(UserError, match=r"at most n_local \(32\) queries, got 64"):
    resolve(spec, 32)


@pytest.fixture(scope="module")
def tiny(tiny_model):
  return tiny_model


def test_model_with_window_over_the_input_equals_dense(tiny):
  config, params, _ = tiny
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 40)), jnp.int32)
  dense = forward(params, config, tokens, attention=Dense(chunk=16, key_block=8))
  infllm = forward(params, config, tokens, attention=InfLLM(n_init=4, n_local=40, block_size=4, chunk=16))
  np.testing.assert_allclose(np.asarray(infllm), np.asarray(dense), atol=1e-4)


def test_cli_nll_with_infllm_options(tiny, tmp_path, capsys):
  config, params, ckpt = tiny
  tokens = np.random.default_rng(1).integers(0, 97, size=70).astype(np.int32)
  np.save(tmp_path / "tokens.npy", tokens)
  options = ("--n-init", "3", "--n-local", "12", "--block-size", "4", "--repr-tokens", "2", "--top-k", "2",
             "--chunk", "8")
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "infllm",
                         *options, "--out", tmp_path / "nll.npy")
  assert code == 0, err
  spec = InfLLM(n_init=3, n_local=12, block_size=4, repr_tokens=2, top_k=2, chunk=8)
  expected = np.asarray(token_nll(params, config, jnp.asarray(tokens)[None], attention=spec))[0]
  np.testing.assert_allclose(np.load(tmp_path / "nll.npy"), expected, atol=1e-5)
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "infllm",
                         *options, "--cached", "--out", tmp_path / "cached.npy")
  assert code == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "cached.npy"), expected, atol=1e-4)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 90)), jnp.int32)
SPEC = dict(n_init=3, n_local=12, block_size=4, repr_tokens=2, top_k=2)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_cached_chunked_nll_equals_one_shot(tiny, chunk):
  """Blocks form and are selected while the text streams through the cache C tokens at a time."""
  config, params, _ = tiny
  spec = InfLLM(**SPEC, chunk=chunk, key_block=8)
  expected = np.asarray(token_nll(params, config, TOKENS, attention=spec))
  got = np.asarray(cached_token_nll(params, config, TOKENS, attention=spec, chunk=chunk))
  np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 10])
def test_cached_stream_at_offset_1e8_equals_offset_0(tiny, chunk):
  """(chunk 1: the single-token path, which reads the ring's rotated copy in place.)"""
  config, params, _ = tiny
  spec = resolve(InfLLM(**SPEC, chunk=chunk), config.max_position_embeddings)

  run = lambda offset: feed_cached(params, config, spec, TOKENS, jnp.broadcast_to(  # noqa: E731
      jnp.arange(90, dtype=jnp.int32) + offset, TOKENS.shape), [chunk] * (90 // chunk), max_len=90)

  np.testing.assert_allclose(run(10**8), run(0), atol=1e-4)


def test_generate_equals_one_shot_argmax(tiny):
  """Greedy generation (prefill and decode one token per chunk) picks the argmax of the one-shot
  logits of its own output, with blocks forming and being selected along the way."""
  config, params, _ = tiny
  spec = InfLLM(**SPEC, chunk=1)
  prompt = np.asarray(TOKENS[0, :40]).tolist()
  out = generate(params, config, [prompt], 24, attention=spec, eos_ids=())[0]
  assert len(out) == 24
  logits = forward(params, config, jnp.asarray([prompt + out]), attention=spec)
  np.testing.assert_array_equal(np.asarray(logits[0, 39:-1]).argmax(-1), out)


def test_cache_pool_too_small_is_a_clear_error(tiny):
  config, _, _ = tiny
  spec = resolve(InfLLM(**SPEC, chunk=8, capacity_blocks=3), config.max_position_embeddings)
  with pytest.raises(UserError, match=r"capacity_blocks=3, but 90 tokens need 18 blocks of 4"):
    init_cache(config, spec, 1, max_len=90)


def test_cache_takes_what_its_pool_holds_then_refuses(tiny):
  """Fed token by token, a cache sized for 60 tokens takes at least 60; each one it takes gets the
  one-shot logits, and the first it refuses gets an error naming the capacity and the need."""
  config, params, _ = tiny
  spec = resolve(InfLLM(**SPEC, chunk=1), config.max_position_embeddings)
  cache = init_cache(config, spec, 1, max_len=60)
  positions = jnp.arange(90, dtype=jnp.int32)[None]
  taken = []
  for i in range(90):
    try:
      logits, cache = forward_cached(params, config, cache, TOKENS[:1, i:i + 1], positions[:, i:i + 1], spec)
    except UserError as e:
      assert re.fullmatch(rf"InfLLM block pool full: capacity_blocks=\d+, but {i + 1} tokens need \d+ blocks of 4",
                          str(e)), e
      break
    taken.append(np.asarray(logits[0, 0]))
  assert 60 <= len(taken) < 90
  expected = np.asarray(forward(params, config, TOKENS[:1, :len(taken)], attention=spec))[0]
  np.testing.assert_allclose(np.stack(taken), expected, atol=1e-4)


def test_blocks_formed_from_a_left_padded_chunk(tiny):
  """A first chunk that forms blocks from its own tokens gives the same cache whether or not padding
  precedes them (generate left-pads a prompt): the next chunk's logits match."""
  config, params, _ = tiny
  spec = resolve(InfLLM(**SPEC, chunk=32), config.max_position_embeddings)
  tokens, positions = TOKENS[:1, :60], jnp.arange(60, dtype=jnp.int32)[None]
  pad_tokens = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens[:, :28]], axis=1)
  pad_positions = jnp.concatenate([jnp.full((1, 4), -1, jnp.int32), positions[:, :28]], axis=1)
  outs = []
  for first in [(tokens[:, :28], positions[:, :28]), (pad_tokens, pad_positions)]:
    cache = init_cache(config, spec, 1, max_len=64)
    first_logits, cache = forward_cached(params, config, cache, *first, spec)
    logits, _ = forward_cached(params, config, cache, tokens[:, 28:], positions[:, 28:], spec)
    outs.append((np.asarray(first_logits)[:, -28:], np.asarray(logits)))
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 12])
def test_cached_released_prefill_nll_equals_one_shot(tiny, chunk):
  """released_prefill through the cache C tokens at a time (chunk 1: the decode path, where it
  changes nothing) equals its one-shot result, which differs from the paper's for chunk > 1."""
  config, params, _ = tiny
  spec = InfLLM(**SPEC, chunk=chunk, key_block=8, released_prefill=True)
  expected = np.asarray(token_nll(params, config, TOKENS, attention=spec))
  got = np.asarray(cached_token_nll(params, config, TOKENS, attention=spec, chunk=chunk))
  np.testing.assert_allclose(got, expected, atol=1e-4)
  paper = np.asarray(cached_token_nll(params, config, TOKENS, attention=InfLLM(**SPEC, chunk=chunk, key_block=8),
                                      chunk=chunk))
  if chunk == 1:
    np.testing.assert_allclose(got, paper, atol=1e-5)
  else:
    assert np.abs(got - paper).max() > 1e-3


def test_cache_refuses_a_released_prefill_chunk_longer_than_n_local(tiny):
  config, params, _ = tiny
  spec = resolve(InfLLM(**SPEC, chunk=12, released_prefill=True), config.max_position_embeddings)
  cache = init_cache(config, spec, 1, max_len=30)
  with pytest.raises(UserError, match=r"at most n_local \(12\) queries, got 13"):
    forward_cached(params, config, cache, TOKENS[:1, :13], jnp.arange(13, dtype=jnp.int32)[None], spec)
