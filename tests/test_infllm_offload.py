"""InfLLM with its block memory in host memory (`offload`): the device's blocks against a plain LRU
written here, every cached path against the in-device pool, and the bytes on each side."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli

from lminf_jax.attention import InfLLM, resolve
from lminf_jax.attention.host_blocks import Held, fetch
from lminf_jax.cache import cache_bytes, check_memory, init_cache
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import cached_token_nll, forward, forward_cached
from lminf_jax.inference.generation import generate
from lminf_jax.inference.stream import stream_nll
from lminf_jax.models.config import LlamaConfig

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=(2, 90)), jnp.int32)
SPEC = dict(n_init=3, n_local=12, block_size=4, repr_tokens=2, top_k=2)


def _lru_reference(wanted_steps, d: int):
  """Per step, each row's slot -> block after the step and its misses, by the rule: a held block
  stays; each missing one (in order) goes to the least recently used slot holding no wanted block,
  empty slots first, ties to the lower slot."""
  rows = len(wanted_steps[0])
  block, used = [[-1] * d for _ in range(rows)], [[-1] * d for _ in range(rows)]
  out = []
  for step, wanted in enumerate(wanted_steps):
    misses = []
    for row, want in enumerate(wanted):
      want = [w for w in want if w >= 0]
      free = sorted((s for s in range(d) if block[row][s] not in want), key=lambda s: (used[row][s], s))
      row_misses = [w for w in want if w not in block[row]]
      for w, s in zip(row_misses, free):
        block[row][s] = w
      for w in want:
        used[row][block[row].index(w)] = 10 * step
      misses.append(len(row_misses))
    out.append(([list(b) for b in block], misses))
  return out


def test_fetch_keeps_held_blocks_and_replaces_the_least_recently_used():
  """Six chunks of two rows over a host pool of 8 blocks, 3 device slots and 2 wanted blocks each
  (-1: none), hits and misses mixed: the slots, the copies counted and the keys read from the
  device's slots are the reference LRU's and the pool's."""
  rng = np.random.default_rng(0)
  b, kv, bs, h, d, n_pool = 2, 2, 4, 3, 3, 8
  pool_k, pool_v = (rng.standard_normal((b, kv, n_pool * bs, h)).astype(np.float32) for _ in range(2))
  wanted = [[[0, 1], [5, -1]], [[1, 2], [5, 6]], [[3, 0], [7, 6]], [[0, 1], [5, 7]], [[4, 2], [7, 5]],
            [[4, 2], [1, 0]]]
  host = lambda x: jax.device_put(jnp.asarray(x)[None], jax.memory.Space.Host)  # noqa: E731 (a pool of one layer)
  never = jnp.full((b, d), -1, jnp.int32)
  held = Held(jnp.zeros((b, kv, d * bs, h)), jnp.zeros((b, kv, d * bs, h)), never, never, jnp.zeros((b,), jnp.int32))
  step = jax.jit(fetch, static_argnames="block_size")
  fetched = np.zeros(b, int)
  for i, (want, (slots, misses)) in enumerate(zip(wanted, _lru_reference(wanted, d))):
    held, slot_bk = step(held, jnp.asarray(want, jnp.int32), host(pool_k), host(pool_v), 0, jnp.full((b,), 10 * i),
                         block_size=bs)
    np.testing.assert_array_equal(np.asarray(held.block_bd), slots)
    fetched += misses
    np.testing.assert_array_equal(np.asarray(held.fetched_b), fetched)
    for row in range(b):
      for j, block in enumerate(want[row]):
        if block >= 0:
          got = np.asarray(held.k_bkxh[row, :, slot_bk[row, j] * bs:(slot_bk[row, j] + 1) * bs])
          np.testing.assert_array_equal(got, pool_k[row, :, block * bs:(block + 1) * bs])
  assert 0 < fetched.sum() < sum(w >= 0 for step in wanted for row in step for w in row)  # (hits and misses)


@pytest.fixture(scope="module")
def tiny(tiny_model):
  return tiny_model


def _pair(chunk: int, device_blocks: int = 2) -> tuple[InfLLM, InfLLM]:
  """(in-device pool, offloaded), 2 device blocks: as many as a chunk selects, so most chunks evict."""
  return InfLLM(**SPEC, chunk=chunk), InfLLM(**SPEC, chunk=chunk, offload=True, device_blocks=device_blocks)


@pytest.mark.parametrize("chunk, device_blocks", [(1, 2), (7, 2), (7, 5)])
def test_offloaded_cached_nll_equals_the_in_device_pool(tiny, chunk, device_blocks):
  config, params, _ = tiny
  pool, offload = _pair(chunk, device_blocks)
  expected = np.asarray(cached_token_nll(params, config, TOKENS, attention=pool, chunk=chunk))
  np.testing.assert_allclose(np.asarray(cached_token_nll(params, config, TOKENS, attention=offload, chunk=chunk)),
                             expected, atol=1e-6)


def test_offloaded_decoding_and_generation_equal_the_in_device_pool(tiny):
  """A 30-token prefill, then one token at a time (the single-token path, which selects per token):
  equal logits, blocks in host memory, and copies that hit and miss the device's blocks. Generation
  from two left-padded prompts gives the in-device pool's tokens."""
  config, params, _ = tiny
  pool, offload = (resolve(s, config.max_position_embeddings) for s in _pair(16))
  positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), TOKENS.shape)
  caches = [init_cache(config, s, 2, max_len=90) for s in (pool, offload)]
  assert caches[1].kv.extra.pool_k.sharding.memory_kind == "pinned_host"
  assert caches[1].kv.extra.held.k_bkxh.sharding.memory_kind == "device"
  for start, stop in [(0, 30)] + [(i, i + 1) for i in range(30, 90)]:
    logits = []
    for n, spec in enumerate((pool, offload)):
      out, caches[n] = forward_cached(params, config, caches[n], TOKENS[:, start:stop], positions[:, start:stop], spec)
      logits.append(np.asarray(out))
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-6)
  fetched = int(np.asarray(caches[1].kv.extra.held.fetched_b).sum())
  wanted = 2 * config.num_layers * 2 * 60  # (2 blocks per decoded token per layer per row, at most)
  assert 0 < fetched < wanted
  prompts = [np.asarray(TOKENS[0, :40]).tolist(), np.asarray(TOKENS[1, :33]).tolist()]
  pool1, offload1 = _pair(1)
  assert generate(params, config, prompts, 24, offload1, eos_ids=()) == generate(params, config, prompts, 24, pool1,
                                                                                eos_ids=())


def test_offloaded_stream_nll_equals_one_shot(tiny):
  config, params, _ = tiny
  pool, offload = _pair(10)
  expected = np.asarray(forward(params, config, TOKENS[:1], attention=pool))
  tokens = np.asarray(TOKENS[0])
  cache = init_cache(config, offload, 1, max_len=90)
  got = stream_nll(params, config, cache, iter(np.split(tokens, range(10, 90, 10))), 90, offload, segment=90)
  logp = expected[0, :-1] - jax.nn.logsumexp(expected[0, :-1], axis=-1, keepdims=True)
  np.testing.assert_allclose(got, -np.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0], atol=1e-4)


def test_cli_nll_cached_with_offload(tiny, tmp_path, capsys):
  """`lminf nll --cached --offload --device-blocks 2` writes the in-device pool's NLL."""
  _, _, ckpt = tiny
  np.save(tmp_path / "tokens.npy", np.asarray(TOKENS[0]))
  nll = ("nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--cached", "--attention", "infllm", "--n-init", "3",
         "--n-local", "12", "--block-size", "4", "--repr-tokens", "2", "--infllm-top-k", "2", "--chunk", "8")
  for name, extra in (("pool", ()), ("offload", ("--offload", "--device-blocks", "2"))):
    code, _, err = run_cli(capsys, *nll, *extra, "--out", tmp_path / f"{name}.npy")
    assert code == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "offload.npy"), np.load(tmp_path / "pool.npy"), atol=1e-6)


SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True, param_dtype="bfloat16",
                      dtype="bfloat16")


def test_device_bytes_stay_flat_and_the_host_holds_the_pool():
  """SmolLM2's shapes in bf16, traced only: from 4K to 64K and 1M tokens the device's bytes, less
  the representative keys (bf16, one per block and query head), stay within 1.1x; the host's
  hold the pool's keys and values, as the in-device pool's device bytes did."""
  spec, offload = InfLLM(), InfLLM(offload=True)
  layers, kv, h = SMOLLM2.num_layers, SMOLLM2.num_kv_heads, SMOLLM2.head_dim
  held = 2 * layers * kv * 32 * 128 * h * 2 + 2 * layers * 32 * 4  # (the 32 blocks and their slot arrays)
  rows = {}
  for n in (4096, 65536, 1 << 20):
    blocks = max(0, (n - 1 - 8192 - 128) // 128)
    rk = layers * SMOLLM2.num_heads * blocks * h * 2
    pool = 2 * layers * kv * blocks * 128 * h * 2
    on, off = cache_bytes(SMOLLM2, spec, n), cache_bytes(SMOLLM2, offload, n)
    assert on.host == 0 and off.host == pool
    rows[n] = off.device - rk
    assert rows[n] == on.device - rk - pool + held
  assert max(rows.values()) / min(rows.values()) <= 1.1


def test_a_pool_the_host_cannot_hold_is_refused_naming_both_sizes(monkeypatch):
  monkeypatch.setattr("lminf_jax.cache.host_memory_bytes", lambda: 2**30)
  monkeypatch.setattr("lminf_jax.cache.device_memory", lambda: ("gpu:0", 80 * 2**30))
  check_memory(SMOLLM2, InfLLM(offload=True), 32768)  # (0.5 GiB of blocks)
  with pytest.raises(UserError, match=r"^the host memory of an infllm cache for 1048576 tokens needs 22\.3 GiB, "
                                      r"more than the 1\.0 GiB of memory of this machine$"):
    check_memory(SMOLLM2, InfLLM(offload=True), 1 << 20)
  check_memory(SMOLLM2, InfLLM(), 1 << 20)  # (in device memory: 80 GiB hold it)
  monkeypatch.setattr("lminf_jax.cache.device_memory", lambda: ("gpu:0", 16 * 2**30))
  with pytest.raises(UserError, match=r"^an infllm cache for 1048576 tokens needs 22\.9 GiB, more than the 16\.0 GiB "
                                      r"of memory of gpu:0 \(offload=true keeps infllm's memory blocks in host memory\)$"):
    check_memory(SMOLLM2, InfLLM(), 1 << 20)


def test_fewer_device_blocks_than_top_k_is_an_error():
  with pytest.raises(UserError, match=r"device_blocks \(8\) must be >= top_k \(16\)"):
    InfLLM(offload=True, device_blocks=8)
