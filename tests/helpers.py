"""Test helpers: tiny random Hugging Face models (the reference) and an in-process CLI runner."""

from __future__ import annotations

import numpy as np

# One tiny config per model kind the converters must handle.
TINY_KINDS = {
    "llama_gqa": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_headdim_untied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 tie_word_embeddings=False),
    "llama3_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=32), rope_theta=500000.0),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    # Sliding windows shorter than the test inputs: every layer of each sees only its last 8 keys.
    "mistral_window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "qwen2_window": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=8, max_window_layers=0),
    "qwen2_bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
  """A randomly initialised transformers model of `kind` (float32, eager attention)."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  spec = dict(TINY_KINDS[kind], **overrides)
  model_type = spec.pop("model_type")
  config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                max_position_embeddings=256, rms_norm_eps=1e-5, **spec)
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
  with torch.no_grad():  # random, not zero, biases and norm scales so that every tensor matters
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
  """Runs `lminf ARGS` in-process: (exit code, stdout, stderr). Uncaught exceptions propagate."""
  from lminf_jax.cli import main

  try:
    code = main([str(a) for a in args])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def feed_cached(params, config, spec, tokens, positions, chunks: list[int], max_len: int | None = None) -> np.ndarray:
  """Logits of feeding `tokens` [B, T] at `positions` through a fresh cache in chunks of the given lengths."""
  from lminf_jax.cache import init_cache
  from lminf_jax.forward import forward_cached

  cache = init_cache(config, spec, tokens.shape[0], max_len=max_len)
  outs, start = [], 0
  for size in chunks:
    logits, cache = forward_cached(params, config, cache, tokens[:, start:start + size],
                                   positions[:, start:start + size], spec)
    outs.append(np.asarray(logits))
    start += size
  return np.concatenate(outs, axis=1)
