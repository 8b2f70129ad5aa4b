"""Converted tiny random models match transformers (PyTorch, float32) logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_KINDS, run_cli, torch_logits

from lminf_jax.attention import Dense
from lminf_jax.inference.forward import forward, token_nll
from lminf_jax.loading import load

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 40))


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_cli_converted_logits_match_transformers(kind, save_tiny, tmp_path, capsys):
  model, hf_dir = save_tiny(kind)
  code, _, err = run_cli(capsys, "convert", hf_dir, tmp_path / "ckpt")
  assert code == 0, err
  config, params, _ = load(tmp_path / "ckpt")
  ours = np.asarray(forward(params, config, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, torch_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_chunked_attention_and_logits_do_not_change_results(save_tiny):
  """Blockwise attention over uneven chunks and chunk-wise logits give the one-shot NLL."""
  from lminf_jax.attention import Dense

  model, hf_dir = save_tiny("llama_gqa")
  config, params, _ = load(hf_dir)
  logits = torch_logits(model, TOKENS)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs[:, :-1], TOKENS[:, 1:, None], axis=-1)[..., 0]
  nll = token_nll(params, config, jnp.asarray(TOKENS), attention=Dense(chunk=7), logits_chunk=6)
  np.testing.assert_allclose(np.asarray(nll), expected, atol=1e-4)


def test_positions_and_left_padding_match_transformers(save_tiny):
  """Explicit positions = HF position_ids; negative positions mark left padding."""
  import torch

  model, hf_dir = save_tiny("qwen2_bias")
  config, params, _ = load(hf_dir)
  pad = 5
  tokens = TOKENS.copy()
  positions = np.broadcast_to(np.arange(40) - pad, (2, 40)).copy()
  positions[1] = np.arange(40)  # row 1 unpadded
  mask = (positions >= 0).astype(np.int64)
  with torch.no_grad():
    expected = model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(np.maximum(positions, 0))).logits.numpy()
  ours = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(positions)))
  np.testing.assert_allclose(ours[0, pad:], expected[0, pad:], atol=1e-4)
  np.testing.assert_allclose(ours[1], expected[1], atol=1e-4)


# Measured on these tiny models (|logits| < 1): max |logit diff| 0.0022 with bfloat16 params and
# 0.0040 with bfloat16 params and compute (bfloat16 keeps 8 mantissa bits).
BF16_BOUND = 1e-2


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_bfloat16_params_within_bound(compute_dtype, save_tiny, tmp_path, capsys):
  import jax

  model, hf_dir = save_tiny("llama_gqa")
  assert run_cli(capsys, "convert", hf_dir, tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
  config, params, _ = load(tmp_path / "bf16")
  assert config.param_dtype == "bfloat16"
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  ours = np.asarray(forward(params, config.replace(dtype=compute_dtype), jnp.asarray(TOKENS)))
  diff = np.abs(ours - torch_logits(model, TOKENS)).max()
  assert diff <= BF16_BOUND, diff


@pytest.mark.parametrize("kind", ["mistral_window", "qwen2_window", "qwen3_window", "phi3_window",
                                  "qwen2_window_layer1", "gemma2", "gemma3_text"])
def test_sliding_window_models_match_transformers_cached_and_generating(kind, save_tiny):
  """A model's own sliding window is applied by `dense` everywhere: the one-shot forward, the cache
  (fed in chunks), and greedy generation past the window equal transformers; also on models
  whose window is on some layers only (qwen2_window_layer1, gemma2)."""
  from helpers import assert_cached_and_greedy_match_transformers

  model, hf_dir = save_tiny(kind)
  config, params, _ = load(hf_dir)
  assert config.sliding_window == 8
  assert_cached_and_greedy_match_transformers(model, params, config, TOKENS)


@pytest.mark.parametrize("kind, arch", [("llama_gqa", "llama"), ("mistral", "mistral"), ("qwen2_bias", "qwen2"),
                                        ("qwen3", "qwen3"), ("qwen3_bias_mha", "qwen3"),
                                        ("phi3_longrope", "phi3"), ("phi3_window", "phi3"), ("mpt", "mpt"),
                                        ("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_gguf_written_by_the_gguf_package_matches_transformers(kind, arch, tmp_path):
  """A GGUF laid out as llama.cpp's converter writes it (q/k permuted for llama and mistral only;
  Gemma's norm scales stored as 1 + w) loads to transformers' logits. (llama.cpp scales Gemma's
  queries by 1/sqrt(head_dim) below 27B, so the Gemmas here have query_pre_attn_scalar = head_dim.)"""
  from helpers import tiny_hf_model, write_gguf

  from lminf_jax.convert.gguf_file import load_gguf

  model = tiny_hf_model(kind, **({"query_pre_attn_scalar": 16} if arch.startswith("gemma") else {}))
  write_gguf(model, tmp_path / "tiny.gguf", arch)
  config, params = load_gguf(tmp_path / "tiny.gguf")
  assert config.model_type == model.config.model_type and config.qk_norm == (arch in ("qwen3", "gemma3"))
  ours = np.asarray(forward(params, config, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, torch_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_gemma_gguf_with_a_bad_window_pattern_is_refused_in_one_line(tmp_path, capsys):
  from helpers import tiny_hf_model, write_gguf

  write_gguf(tiny_hf_model("gemma2"), tmp_path / "g.gguf", "gemma2", sliding_window_pattern=0)
  code, _, err = run_cli(capsys, "convert", tmp_path / "g.gguf", tmp_path / "ckpt")
  assert code != 0 and err.startswith("lminf: error: ") and "sliding_window_pattern" in err and err.count("\n") == 1
  assert not (tmp_path / "ckpt").exists()


def test_gguf_generation_ends_at_eos_eot_and_eom(tmp_path):
  """llama.cpp ends generation at a GGUF's end-of-text, end-of-turn and end-of-message ids
  (tokenizer.ggml.eos/eot/eom_token_id); so does a GGUF's conversion, and without eot/eom at EOS only."""
  from helpers import tiny_hf_model, write_gguf

  from lminf_jax.convert.gguf_file import load_gguf

  model = tiny_hf_model("llama_gqa")
  write_gguf(model, tmp_path / "chat.gguf", "llama", eos_token_id=2, eot_token_id=7, eom_token_id=9)
  write_gguf(model, tmp_path / "base.gguf", "llama", eos_token_id=2)
  assert load_gguf(tmp_path / "chat.gguf")[0].eos_token_ids == (2, 7, 9)
  assert load_gguf(tmp_path / "base.gguf")[0].eos_token_ids == (2,)


def test_longrope_short_and_long_factors_match_transformers(save_tiny):
  """Phi-3's longrope (partial rotary 0.75) uses its short factors while a call's largest position
  + 1 is within original_max_position_embeddings (32) and its long ones past it, as transformers
  does per call: one-shot logits of 20 and of 40 tokens, and greedy generation from a prompt on
  each side, prefilled in one call, against greedy decoding by full transformers forwards (the
  decode steps stay on the prompt's side, where a cache agrees with them; transformers' own
  `generate` special-cases Phi-3 near the switch)."""

  from lminf_jax.attention import Lambda
  from lminf_jax.inference.generation import generate

  model, hf_dir = save_tiny("phi3_longrope")
  config, params, _ = load(hf_dir)
  assert config.rotary_dim == 12 and config.rope_scaling.kind == "longrope"
  for t in (20, 40):
    ours = np.asarray(forward(params, config, jnp.asarray(TOKENS[:, :t])))
    np.testing.assert_allclose(ours, torch_logits(model, TOKENS[:, :t]), atol=1e-4, rtol=0)
  for prompt_len, new in ((12, 15), (36, 10)):
    expected = TOKENS[0, :prompt_len].tolist()
    for _ in range(new):
      expected.append(int(torch_logits(model, np.asarray([expected]))[0, -1].argmax()))
    for attention in (Dense(), Lambda(n_global=2, n_local=64)):  # (lambda's window holds it all: dense's tokens)
      assert generate(params, config, [expected[:prompt_len]], new, attention=attention, eos_ids=(), chunk=64)[0] \
          == expected[prompt_len:], (prompt_len, attention)
