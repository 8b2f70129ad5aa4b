"""RoPE scaling dynamic (Dynamic NTK) and yarn read from config.json, and the zero-shot override
(`lminf_jax.with_rope_scaling`, `--rope-scaling`: ntk, linear, dynamic, yarn), against transformers:
its logits, its inverse frequencies and attention scaling, its greedy generation and its KV cache fed
chunk by chunk (dynamic's documented cache behaviour, docs/caches.md#rope-scaling-through-a-cache);
export round trips; and the one-line errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import feed_cached, run_cli, tiny_hf_model, torch_logits

from lminf_jax.attention import Dense, Lambda
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import forward, token_nll
from lminf_jax.loading import load
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import rope_frequencies
from lminf_jax.models.rope_scaling import with_rope_scaling

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 40))
ORIGINAL = 24  # the dynamic models' max_position_embeddings: 40 tokens go past it


def _gemma3(full: dict, **overrides) -> dict:
  return dict(rope_parameters={"full_attention": dict(full, rope_theta=1e6),
                               "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}, **overrides)


# (tiny kind, config overrides): config.json's RoPE settings as transformers reads them.
CONFIGS = {
    "yarn": ("llama_gqa", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    # 12 frequencies, and a ramp from dim 1.22 to 3.93 that truncation would round out to 1 and 4
    "yarn_no_truncate_betas": ("llama_headdim_untied", dict(rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, truncate=False, beta_fast=4,
        beta_slow=0.5))),
    "yarn_attention_factor_4x_keys": ("qwen2_bias", dict(rope_scaling=dict(
        type="yarn", factor=8.0, original_max_position_embeddings=16, attention_factor=1.3))),
    "yarn_deepseek_mscale": ("llama_headdim_untied", dict(rope_scaling=dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.5))),
    "yarn_factor_from_lengths": ("qwen3", dict(rope_scaling=dict(rope_type="yarn", factor=None,
                                                                 original_max_position_embeddings=64))),
    # transformers reads truncate at the top of rope_parameters, never per layer type: always true on Gemma 3
    "yarn_gemma3": ("gemma3_text", _gemma3(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                truncate=False))),
    "dynamic": ("llama_gqa", dict(max_position_embeddings=ORIGINAL, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "dynamic_4x_keys": ("qwen2_bias", dict(max_position_embeddings=ORIGINAL, rope_scaling=dict(type="dynamic",
                                                                                              factor=4.0))),
    "dynamic_gemma3": ("gemma3_text", _gemma3(dict(rope_type="dynamic", factor=4.0), max_position_embeddings=ORIGINAL)),
}


def _hf_rotary(model) -> tuple[np.ndarray, float]:
  """transformers' current inverse frequencies and attention scaling (Gemma 3: its global layers')."""
  rotary = model.model.rotary_emb
  prefix = "full_attention_" if hasattr(rotary, "full_attention_inv_freq") else ""
  return getattr(rotary, f"{prefix}inv_freq").numpy(), getattr(rotary, f"{prefix}attention_scaling")


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_config_json_scaling_matches_transformers(case, tmp_path):
  """Logits of 20 and then 40 tokens (dynamic: below, then past its 24 positions; yarn's original
  lengths are 16 or 64) equal transformers', and so do the frequencies and the attention factor the
  40-token call used."""
  kind, overrides = CONFIGS[case]
  model = tiny_hf_model(kind, **overrides)
  model.save_pretrained(tmp_path / "hf")
  config, params, _ = load(tmp_path / "hf")
  assert config.rope_scaling.kind == case.split("_")[0]
  for t in (20, 40):  # (increasing: transformers' dynamic frequencies only grow, per model)
    ours = np.asarray(forward(params, config, jnp.asarray(TOKENS[:, :t])))
    np.testing.assert_allclose(ours, torch_logits(model, TOKENS[:, :t]), atol=1e-5, rtol=0)
  inv_freq, attention = _hf_rotary(model)
  positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
  np.testing.assert_allclose(np.asarray(rope_frequencies(config, positions)), inv_freq, rtol=2e-6)
  assert config.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)


# The override on a llama of 24 positions, and the rope_parameters transformers runs for it (head_dim 8).
OVERRIDES = {
    "yarn:factor=4": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
    "yarn:factor=4,original_max_position_embeddings=16,beta_fast=16,beta_slow=2,truncate=false,attention_factor=1.2":
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16, beta_slow=2,
             truncate=False, attention_factor=1.2),
    "ntk:factor=4": dict(rope_type="default", rope_theta=10000.0 * 4.0 ** (8 / 6)),
    "linear:factor=2": dict(rope_type="linear", factor=2.0),
    "dynamic:factor=2": dict(rope_type="dynamic", factor=2.0),
}


def _hf_with_rope(hf_dir, rope: dict):
  """transformers' model of `hf_dir` (its weights) with `rope` as its rope_parameters."""
  from transformers import AutoConfig, AutoModelForCausalLM

  hf_config = AutoConfig.from_pretrained(hf_dir)
  hf_config.rope_parameters = {"rope_theta": 10000.0, **rope}
  return AutoModelForCausalLM.from_pretrained(hf_dir, config=hf_config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llama24(tmp_path_factory):
  """(HF dir, config, params) of a tiny llama (GQA) trained to 24 positions, no scaling."""
  out = tmp_path_factory.mktemp("llama24") / "hf"
  tiny_hf_model("llama_gqa", max_position_embeddings=ORIGINAL).save_pretrained(out)
  config, params, _ = load(out)
  return out, config, params


@pytest.mark.parametrize("spec", sorted(OVERRIDES))
def test_override_equals_transformers_with_that_rope_config(spec, llama24):
  hf_dir, config, params = llama24
  scaled = with_rope_scaling(config, spec)
  ours = np.asarray(forward(params, scaled, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, torch_logits(_hf_with_rope(hf_dir, OVERRIDES[spec]), TOKENS), atol=1e-5, rtol=0)
  assert np.abs(ours - np.asarray(forward(params, config, jnp.asarray(TOKENS)))).max() > 1e-3  # (it changed them)


def _nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]


def test_cli_override_gives_what_python_gives_and_transformers(llama24, tmp_path, capsys):
  """`lminf nll --rope-scaling yarn:factor=4` equals `token_nll` on `with_rope_scaling(config, ...)` and
  transformers' NLL with that rope config; `--attention lambda --rope-scaling ntk:factor=4` (one flag
  each) equals Python's lambda on the ntk config."""
  hf_dir, config, params = llama24
  np.save(tmp_path / "tokens.npy", TOKENS[0].astype(np.int32))
  tokens = jnp.asarray(TOKENS[:1])
  code, _, err = run_cli(capsys, "nll", hf_dir, "--tokens-file", tmp_path / "tokens.npy", "--out", tmp_path / "yarn.npy",
                         "--rope-scaling", "yarn:factor=4")
  assert code == 0, err
  python = np.asarray(token_nll(params, with_rope_scaling(config, "yarn:factor=4"), tokens))[0]
  np.testing.assert_allclose(np.load(tmp_path / "yarn.npy"), python, atol=1e-6)
  reference = _nll(torch_logits(_hf_with_rope(hf_dir, OVERRIDES["yarn:factor=4"]), TOKENS[:1]), TOKENS[:1])[0]
  np.testing.assert_allclose(np.load(tmp_path / "yarn.npy"), reference, atol=1e-5)
  code, _, err = run_cli(capsys, "nll", hf_dir, "--tokens-file", tmp_path / "tokens.npy", "--out", tmp_path / "l.npy",
                         "--attention", "lambda", "--n-global", "2", "--n-local", "8", "--rope-scaling", "ntk:factor=4")
  assert code == 0, err
  python = token_nll(params, with_rope_scaling(config, "ntk:factor=4"), tokens, attention=Lambda(n_global=2, n_local=8))
  np.testing.assert_allclose(np.load(tmp_path / "l.npy"), np.asarray(python)[0], atol=1e-6)


# --- Dynamic NTK through caches (docs/caches.md#rope-scaling-through-a-cache)

def _rotate(k_bksh, angle_sr):
  """Half-split RoPE of keys [B, K, S, H] by angles [S, H/2]."""
  import torch

  cos, sin = torch.cos(angle_sr), torch.sin(angle_sr)
  k1, k2 = k_bksh.chunk(2, dim=-1)
  return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)


def _hf_fed_in_chunks(model, tokens: np.ndarray, chunks: list[int], ring: int | None = None) -> np.ndarray:
  """transformers' logits of `tokens` fed in chunks through its KV cache (a fresh model: its dynamic
  frequencies grow with each chunk's length). With `ring` W, before each chunk every cached key is
  rotated further by (the chunk's frequencies - those its anchor part has) * its anchor, position -
  position % W: how a key in a cache ring of W slots is read, as docs/caches.md states."""
  import torch
  from transformers import DynamicCache
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  rotary, original = model.model.rotary_emb, model.config.max_position_embeddings
  cache = DynamicCache(config=model.config)
  anchor_freq = {}  # position -> the frequencies its cached key's anchor part is rotated with
  outs, start = [], 0
  for size in chunks:
    end = start + size
    freq = (rotary.original_inv_freq if end <= original else
            ROPE_INIT_FUNCTIONS["dynamic"](model.config, seq_len=torch.tensor(end))[0])
    if ring and start:
      for layer in cache.layers:
        pos = torch.arange(start - layer.keys.shape[2], start)
        written = torch.stack([anchor_freq[int(p)] for p in pos])
        layer.keys = _rotate(layer.keys, (freq[None] - written) * (pos - pos % ring)[:, None].float())
    anchor_freq.update({p: freq for p in range(end)})
    with torch.no_grad():
      outs.append(model(torch.as_tensor(tokens[:, start:end]), past_key_values=cache, use_cache=True).logits.numpy())
    np.testing.assert_allclose(rotary.inv_freq.numpy(), freq.numpy())  # (transformers used those frequencies)
    start = end
  return np.concatenate(outs, axis=1)


def _dynamic(kind: str = "llama_gqa", **overrides):
  return tiny_hf_model(kind, max_position_embeddings=ORIGINAL, rope_scaling=dict(rope_type="dynamic", factor=4.0),
                       **overrides)


@pytest.fixture(scope="module")
def dynamic_llama(tmp_path_factory):
  out = tmp_path_factory.mktemp("dynamic") / "hf"
  _dynamic().save_pretrained(out)
  config, params, _ = load(out)
  return config, params


POSITIONS = np.broadcast_to(np.arange(40, dtype=np.int32), TOKENS.shape)
CHUNKS = [5, 16, 3] + [1] * 16  # (below the length, past it, then decoding)


def test_dynamic_cache_in_one_chunk_equals_one_shot_and_generation_equals_transformers(dynamic_llama):
  """A cache prefilled in one chunk past the length equals transformers' one-shot logits (dense) and
  lambda's one-shot forward; greedy generation (prefill in one chunk, then decode steps that each
  take their own frequencies) equals transformers' `generate` across the length."""
  import torch

  config, params = dynamic_llama
  np.testing.assert_allclose(feed_cached(params, config, Dense(), TOKENS, POSITIONS, [40], max_len=40),
                             torch_logits(_dynamic(), TOKENS), atol=1e-5, rtol=0)
  spec = config.resolve_attention(Lambda(n_global=2, n_local=16))
  np.testing.assert_allclose(feed_cached(params, config, spec, TOKENS, POSITIONS, [40], max_len=40),
                             np.asarray(forward(params, config, jnp.asarray(TOKENS), attention=spec)), atol=1e-5)
  from lminf_jax.inference.generation import generate

  prompt = TOKENS[0, :20].tolist()  # (decoding crosses the length at its 5th token)
  with torch.no_grad():
    expected = _dynamic().generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
  assert generate(params, config, [prompt], 12, attention=Dense(), eos_ids=(), chunk=64)[0] == expected[0, 20:].tolist()


def test_generate_prefills_a_dynamic_prompt_in_one_call_as_transformers(dynamic_llama, monkeypatch):
  """A prompt past the length and longer than the method's chunk is prefilled in one call, as
  transformers' `generate` does (chunks would each take their own frequencies; an explicit chunk
  is kept): its logits are transformers' one-shot ones, and the tokens its `generate`'s."""
  import torch

  from lminf_jax.inference import generation

  config, params = dynamic_llama
  prompt = TOKENS[1, :36].tolist()
  calls = []
  prefill = generation._prefill
  monkeypatch.setattr(generation, "_prefill", lambda *a, **k: calls.append(a[6]) or prefill(*a, **k))
  with torch.no_grad():
    expected = _dynamic().generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0)
  got = generation.generate(params, config, [prompt], 4, attention=Dense(chunk=16), eos_ids=())
  generation.generate(params, config, [prompt], 4, attention=Dense(chunk=16), eos_ids=(), chunk=16)
  assert got == [expected[0, 36:].tolist()] and calls == [36, 16]
  one_call = feed_cached(params, config, Dense(), TOKENS[1:, :36], POSITIONS[1:, :36], [36], max_len=40)
  np.testing.assert_allclose(one_call, torch_logits(_dynamic(), TOKENS[1:, :36]), atol=1e-5, rtol=0)
  chunked = feed_cached(params, config, Dense(), TOKENS[1:, :36], POSITIONS[1:, :36], [16, 16, 4], max_len=40)
  assert np.abs(chunked[0, -1] - one_call[0, -1]).max() > 1e-4  # (chunks would give other logits)


def test_dynamic_dense_cache_fed_in_chunks_equals_transformers_cache_fed_alike(dynamic_llama):
  """Fed chunk by chunk past the length, each chunk's queries and keys take the chunk's frequencies
  and cached keys keep those they were written with: transformers' KV cache fed the same chunks, not
  the one-shot logits."""
  config, params = dynamic_llama
  got = feed_cached(params, config, Dense(), TOKENS, POSITIONS, CHUNKS, max_len=40)
  np.testing.assert_allclose(got, _hf_fed_in_chunks(_dynamic(), TOKENS, CHUNKS), atol=1e-5, rtol=0)
  assert np.abs(got - torch_logits(_dynamic(), TOKENS)).max() > 1e-3  # (the documented difference is real)


def test_dynamic_ring_keys_read_from_their_anchor_as_documented(tmp_path):
  """A model's sliding window (8, a ring of 8 slots) fed chunk by chunk past the length: a ring key's
  rotation within the ring (position - anchor) is its writing chunk's, the rest (anchor) the reading
  chunk's, i.e. transformers' cached key rotated further by (new - old frequencies) * anchor."""
  model = _dynamic("mistral_window")
  model.save_pretrained(tmp_path / "hf")
  config, params, _ = load(tmp_path / "hf")
  got = feed_cached(params, config, Dense(), TOKENS, POSITIONS, CHUNKS, max_len=40)
  np.testing.assert_allclose(got, _hf_fed_in_chunks(_dynamic("mistral_window"), TOKENS, CHUNKS, ring=8), atol=1e-5,
                             rtol=0)
  assert np.abs(got - _hf_fed_in_chunks(_dynamic("mistral_window"), TOKENS, CHUNKS)).max() > 1e-3



def _hf_lambda_token_by_token(model, tokens: np.ndarray, n_global: int, window: int, limit: int,
                              starts_read_with_reader: bool = True) -> np.ndarray:
  """transformers' logits of `tokens` fed one token per call under LM-Infinite's Lambda rule, each call's
  keys picked and re-rotated as docs/caches.md states for a ring of `window` slots plus starting keys
  kept before RoPE: a window key (distance < window) rotated further by (the call's frequencies - its
  writer's) * its anchor; a starting key (< n_global, distance >= window) rotated entirely with the
  call's frequencies at distance `limit` from the query (with `starts_read_with_reader=False`: its
  writer's frequencies, as a cache of rotated keys would hold it)."""
  import torch
  from transformers import DynamicCache
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  rotary, original = model.model.rotary_emb, model.config.max_position_embeddings
  n_layers = model.config.num_hidden_layers
  keys, values, written = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)], []  # per position
  outs = []
  for p in range(tokens.shape[1]):
    freq = (rotary.original_inv_freq if p + 1 <= original else
            ROPE_INIT_FUNCTIONS["dynamic"](model.config, seq_len=torch.tensor(p + 1))[0])
    seen = [j for j in range(p) if p - j < window or j < n_global]
    angle = torch.stack([
        (freq - written[j]) * (j - j % window) if p - j < window else
        (freq if starts_read_with_reader else written[j]) * (p - limit) - written[j] * j for j in seen]) \
        if seen else None
    cache = DynamicCache(config=model.config)
    for layer in range(n_layers if seen else 0):
      cache.update(_rotate(torch.cat([keys[layer][j] for j in seen], dim=2), angle),
                   torch.cat([values[layer][j] for j in seen], dim=2), layer)
    with torch.no_grad():
      out = model(torch.as_tensor(tokens[:, p:p + 1]), position_ids=torch.full((tokens.shape[0], 1), p),
                  past_key_values=cache, use_cache=True)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), freq.numpy())  # (transformers used those frequencies)
    outs.append(out.logits.numpy())
    for layer in range(n_layers):
      keys[layer].append(cache.layers[layer].keys[:, :, -1:])
      values[layer].append(cache.layers[layer].values[:, :, -1:])
    written.append(freq)
  return np.concatenate(outs, axis=1)


def test_dynamic_starting_keys_take_the_reading_chunks_frequencies(dynamic_llama):
  """Lambda (2 starting keys kept before RoPE, a ring of 8, limit 8) prefilled below the length, then
  decoded one token per call past it: its starting keys are rotated entirely with each call's
  frequencies and its ring keys as documented, i.e. transformers fed token by token with its cached
  keys so picked and re-rotated."""
  config, params = dynamic_llama
  spec = config.resolve_attention(Lambda(n_global=2, n_local=8))
  got = feed_cached(params, config, spec, TOKENS, POSITIONS, [20] + [1] * 20, max_len=40)
  np.testing.assert_allclose(got, _hf_lambda_token_by_token(_dynamic(), TOKENS, 2, 8, 8), atol=1e-5, rtol=0)
  assert np.abs(got - _hf_lambda_token_by_token(_dynamic(), TOKENS, 2, 8, 8, starts_read_with_reader=False)
                ).max() > 1e-3  # (the rule is seen)


# --- Export

EXPORTS = {  # (tiny kind, config overrides, --rope-scaling or None)
    "yarn_deepseek_mscale": CONFIGS["yarn_deepseek_mscale"] + (None,),
    "dynamic": CONFIGS["dynamic"] + (None,),
    "yarn_gemma3_override": ("gemma3_text", dict(max_position_embeddings=ORIGINAL), "yarn:factor=4,beta_slow=2"),
    "dynamic_override": ("qwen2_bias", dict(max_position_embeddings=ORIGINAL), "dynamic:factor=2"),
    "ntk_override_phi3": ("phi3_window", dict(max_position_embeddings=ORIGINAL), "ntk:factor=4"),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_round_trip(case, tmp_path, capsys):
  """`lminf export` (with --rope-scaling for the overrides) writes what transformers reads back to our
  logits, frequencies and attention factor, and what we read back to the same scaling (ntk: default
  RoPE at its scaled theta)."""
  from transformers import AutoModelForCausalLM

  kind, overrides, spec = EXPORTS[case]
  source = tiny_hf_model(kind, **overrides)
  source.save_pretrained(tmp_path / "hf")
  code, _, err = run_cli(capsys, "export", tmp_path / "hf", tmp_path / "out", *(("--rope-scaling", spec) if spec else ()))
  assert code == 0, err
  config, params, _ = load(tmp_path / "hf")
  config = with_rope_scaling(config, spec) if spec else config
  exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  ours = np.asarray(forward(params, config, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(torch_logits(exported, TOKENS), ours, atol=1e-5, rtol=0)
  if spec is None:
    np.testing.assert_allclose(torch_logits(source, TOKENS), ours, atol=1e-5, rtol=0)
  inv_freq, attention = _hf_rotary(exported)
  positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
  np.testing.assert_allclose(np.asarray(rope_frequencies(config, positions)), inv_freq, rtol=2e-6)
  assert config.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
  back, _, _ = load(tmp_path / "out")
  if config.rope_scaling.kind == "ntk":
    r = config.rotary_dim
    assert back.rope_scaling.kind == "default" and back.rope_theta == pytest.approx(config.rope_theta * 4 ** (r / (r - 2)))
  else:
    assert back.rope_scaling == config.rope_scaling and back.rope_theta == config.rope_theta


def test_gguf_yarn_reads_its_original_length(tmp_path):
  """A GGUF with llama.cpp's YaRN keys (type, factor, original context length) loads to transformers'
  logits of the model it was written from; YaRN keys without a transformers counterpart are refused."""
  import gguf
  from helpers import write_gguf

  from lminf_jax.convert.gguf_file import load_gguf

  model = tiny_hf_model("qwen2_bias", rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                        original_max_position_embeddings=16))
  yarn = dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0, rope_scaling_orig_ctx_len=16)
  write_gguf(model, tmp_path / "yarn.gguf", "qwen2", **yarn)
  config, params = load_gguf(tmp_path / "yarn.gguf")
  assert (config.rope_scaling.kind, config.rope_scaling.original_max_position_embeddings) == ("yarn", 16)
  np.testing.assert_allclose(np.asarray(forward(params, config, jnp.asarray(TOKENS))), torch_logits(model, TOKENS),
                             atol=1e-5, rtol=0)
  write_gguf(model, tmp_path / "ext.gguf", "qwen2", **yarn, rope_scaling_yarn_ext_factor=0.5)
  with pytest.raises(UserError, match="rope.scaling.yarn_ext_factor is not read"):
    load_gguf(tmp_path / "ext.gguf")


# --- Errors: one line each

def _hf_dir(tmp_path, kind: str = "llama_gqa", **config_changes):
  out = tmp_path / f"hf_{kind}_{len(list(tmp_path.glob('hf_*')))}"
  tiny_hf_model(kind).save_pretrained(out)
  if config_changes:
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
  return out


SPEC_ERRORS = {  # a spec refused before any model loads: what the message names
    "yarn:factr=4": ["yarn has no field 'factr'", "factor"],
    "yarn:factor=0": ["factor must be a finite number > 0", "'0'"],
    "yarn:factor=abc": ["factor must be a finite number > 0", "'abc'"],
    "yarn:factor=inf": ["factor must be a finite number > 0"],
    "yarn": ["give yarn's factor"],
    "yarn:factor=4,factor=2": ["factor given twice"],
    "yarn:factor=4,truncate=maybe": ["truncate must be true or false", "'maybe'"],
    "yarn:factor=4,original_max_position_embeddings=1.5": ["original_max_position_embeddings must be an integer"],
    "yarn:factor": ["give NAME=VALUE"],
    "linear:factor=2,beta_fast=3": ["linear has no field 'beta_fast'"],
    "dynamo:factor=2": ["unknown kind 'dynamo'", "ntk, linear, dynamic, yarn"],
    "llama3:factor=8": ["unknown kind 'llama3'"],
}


@pytest.mark.parametrize("spec", sorted(SPEC_ERRORS))
def test_bad_spec_is_one_line(spec, tmp_path, capsys):
  code, _, err = run_cli(capsys, "nll", tmp_path / "nowhere", "--out", tmp_path / "o.npy", "--rope-scaling", spec)
  assert code != 0 and err.startswith("lminf: error: ") and err.count("\n") == 1, err
  assert all(part in err for part in SPEC_ERRORS[spec]), err
  config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
  with pytest.raises(UserError) as info:  # (the same message from Python)
    with_rope_scaling(config, spec)
  assert all(part in str(info.value) for part in SPEC_ERRORS[spec])


def test_model_errors_are_one_line(tmp_path, capsys):
  """An override on an ALiBi model (MPT); config.json kinds transformers does not run (proportional;
  dynamic on Phi-3, whose class takes default and longrope only) or bad fields; exports transformers
  cannot express."""
  np.save(tmp_path / "t.npy", TOKENS[0].astype(np.int32))
  nll = ("nll", "--tokens-file", tmp_path / "t.npy", "--out", tmp_path / "o.npy")
  cases = [
      (nll, _hf_dir(tmp_path, "mpt"), ("--rope-scaling", "yarn:factor=4"), ["'yarn:factor=4'", "mpt has ALiBi"]),
      (nll, _hf_dir(tmp_path, rope_parameters=dict(rope_type="proportional", factor=2.0)), (),
       ["unsupported rope scaling 'proportional'", "dynamic, yarn"]),
      (nll, _hf_dir(tmp_path, "qwen3", rope_parameters=dict(rope_type="yarn", factor=0.0)), (),
       ["bad rope scaling", "factor must be a finite number > 0, got 0.0"]),
      (nll, _hf_dir(tmp_path, "mistral", rope_parameters=dict(rope_type="dynamic")), (), ["bad rope scaling", "KeyError"]),
      (nll, _hf_dir(tmp_path, "phi3_window", rope_parameters=dict(rope_type="dynamic", factor=2.0)), (),
       ["unsupported rope scaling 'dynamic'", "supported: default, longrope"]),
      (("export",), _hf_dir(tmp_path, "phi3_window"), (tmp_path / "x1", "--rope-scaling", "yarn:factor=2"),
       ["cannot export", "phi3 takes no rope_type yarn", "default, longrope"]),
      (("export",), _hf_dir(tmp_path), (tmp_path / "x2", "--rope-scaling",
                                        "dynamic:factor=2,original_max_position_embeddings=64"),
       ["cannot export", "dynamic scaling grows from max_position_embeddings (256), not from 64"]),
      (("export",), _hf_dir(tmp_path, "gemma3_text"), (tmp_path / "x3", "--rope-scaling", "yarn:factor=2,truncate=false"),
       ["cannot export", "gemma3_text always truncates"]),
  ]
  capsys.readouterr()  # (what saving the models printed)
  for (command, *options), src, extra, parts in cases:
    code, _, err = run_cli(capsys, command, src, *options, *extra)
    assert code != 0 and err.startswith("lminf: error: ") and err.count("\n") == 1, err
    assert all(part in err for part in parts), (err, parts)
  assert not any((tmp_path / name).exists() for name in ("o.npy", "x1", "x2", "x3"))
