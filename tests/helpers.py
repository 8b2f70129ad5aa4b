"""Test helpers: tiny random Hugging Face models (the reference) and an in-process CLI runner."""

from __future__ import annotations

import os

import numpy as np

# Cases marked `slow`, and wider random searches, widen what CI's suite covers (more meshes, more
# examples, the real model through a mesh); they run only with LMINF_SLOW=1: scripts/slow_tests.sh.
SLOW = bool(os.environ.get("LMINF_SLOW"))

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
    # Qwen2's max_window_layers=1: layer 0 full, layer 1 windowed.
    "qwen2_window_layer1": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2,
                                use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen2_bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen3: per-head q/k RMSNorm before RoPE; a head_dim apart from hidden/heads; attention_bias on every projection.
    "qwen3": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=12),
    "qwen3_bias_mha": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                           tie_word_embeddings=False),
    "qwen3_window": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=8, max_window_layers=0),
    # Phi-3: fused qkv_proj and gate_up_proj; partial rotary (Phi-4-mini's 0.75) with longrope, whose factor (256 / 32)
    # and attention factor come from the lengths, and whose long factors apply past 32 positions; a window of 8.
    "phi3_longrope": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2,
                          partial_rotary_factor=0.75, original_max_position_embeddings=32,
                          rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(6)],
                                            long_factor=[2.0 + 0.5 * i for i in range(6)])),
    "phi3_window": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2,
                        sliding_window=8, tie_word_embeddings=True),
    # MPT: ALiBi (no RoPE), LayerNorm without bias, fused Wqkv, a GELU MLP of 4 * d_model, tied embeddings. Its
    # positions stop at max_seq_len (transformers builds the bias up to it; it ignores attn_config's alibi_bias_max,
    # which we follow as MosaicML's code does: every released MPT has 8).
    "mpt": dict(model_type="mpt", num_attention_heads=4, max_seq_len=256),
    "mpt_8heads": dict(model_type="mpt", num_attention_heads=8, max_seq_len=256),
    # Gemma 2: (1 + w) RMSNorms before and after attention and MLP, GeGLU (tanh), embeddings times sqrt(D),
    # query_pre_attn_scalar, attention and final soft-capping (small caps, so that they bite), and a window of 8 on
    # layers 0 and 2 of 3.
    "gemma2": dict(model_type="gemma2", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                   sliding_window=8),
    # Gemma 3: as Gemma 2 with (1 + w) q/k norms, no soft-caps, the 5:1 pattern (layers 0-4 windowed, 5 global), and
    # RoPE per layer type: theta 10000 on the windowed layers, linear scaling 4 and theta 10^6 on the global one.
    "gemma3_text": dict(model_type="gemma3_text", num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
}


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
  """A randomly initialised transformers model of `kind` (float32, eager attention)."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  spec = dict(TINY_KINDS[kind], **overrides)
  model_type = spec.pop("model_type")
  sizes = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=256,
               rms_norm_eps=1e-5)
  config = AutoConfig.for_model(model_type, **{**sizes, **spec})
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
  from lminf_jax.inference.forward import forward_cached

  cache = init_cache(config, spec, tokens.shape[0], max_len=max_len)
  outs, start = [], 0
  for size in chunks:
    logits, cache = forward_cached(params, config, cache, tokens[:, start:start + size],
                                   positions[:, start:start + size], spec)
    outs.append(np.asarray(logits))
    start += size
  return np.concatenate(outs, axis=1)


def assert_cached_and_greedy_match_transformers(model, params, config, tokens: np.ndarray) -> None:
  """`dense` through a cache fed in chunks of 5, 16 and the rest gives transformers' logits of
  `tokens` [B, T], and greedy generation of 20 tokens after row 0's first 12 gives its tokens."""
  import torch

  from lminf_jax.attention import Dense
  from lminf_jax.inference.generation import generate

  t = tokens.shape[1]
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  cached = feed_cached(params, config, Dense(), tokens, positions, [5, 16, t - 21], max_len=t)
  np.testing.assert_allclose(cached, torch_logits(model, tokens), atol=1e-4, rtol=0)
  prompt = tokens[0, :12].tolist()
  with torch.no_grad():
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
  assert generate(params, config, [prompt], 20, attention=Dense(), eos_ids=(), chunk=5)[0] == \
      expected[0, len(prompt):].tolist()


def write_gguf(model, path, arch: str, **metadata) -> None:
  """Writes a transformers model as a float32 GGUF the way llama.cpp's convert_hf_to_gguf.py
  names and lays out the tensors: llama/mistral q/k rows permuted for interleaved RoPE, qwen and
  phi3 (NEOX RoPE) as they are, phi3's fused projections kept fused. Only the metadata the loader
  reads, plus `metadata` (name: the GGUFWriter.add_NAME method); no tokenizer."""
  import gguf

  if arch == "mpt":
    return _write_mpt_gguf(model, path, **metadata)
  cfg = model.config
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
  writer = gguf.GGUFWriter(str(path), arch)
  for name, value in metadata.items():
    getattr(writer, f"add_{name}")(value)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if arch != "gemma3":  # (per layer type: below)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_context_length(cfg.max_position_embeddings)
  if getattr(cfg, "sliding_window", None):
    writer.add_sliding_window(cfg.sliding_window)
  rope = cfg.rope_parameters
  gemma = arch in ("gemma2", "gemma3")
  if gemma:  # as convert_hf_to_gguf.py's Gemma2Model / Gemma3Model: soft-caps, window, the global layers' RoPE
    if arch == "gemma2":
      writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
      writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
      full = rope["full_attention"]
      writer.add_rope_freq_base(full["rope_theta"])
      if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
  if arch == "phi3":  # as convert_hf_to_gguf.py's Phi3MiniModel: rotary dims, and longrope's factors as tensors
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "longrope":
      writer.add_rope_scaling_attn_factors(model.model.rotary_emb.attention_scaling)
      writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
      writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
      writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))

  def permute(w, n):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
  layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
  if gemma:
    layer_names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                        "post_feedforward_layernorm": "post_ffw_norm"})
  for name, tensor in model.state_dict().items():
    w = tensor.float().numpy()
    if gemma and name.endswith("norm.weight"):
      w = w + 1  # (llama.cpp stores Gemma's norm scales as 1 + w)
    parts = name.removeprefix("model.").split(".")
    if parts[0] == "layers":
      module = ".".join(parts[2:-1])
      kind = layer_names[module]
      if arch in ("llama", "mistral") and kind in ("attn_q", "attn_k"):
        w = permute(w, heads if kind == "attn_q" else kv_heads)
      writer.add_tensor(f"blk.{parts[1]}.{kind}.{parts[-1]}", w)
    elif not (parts[0] == "lm_head" and cfg.tie_word_embeddings):
      writer.add_tensor(f"{names[parts[0]]}.{parts[-1]}", w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _write_mpt_gguf(model, path, **metadata) -> None:
  """`write_gguf` for MPT, as convert_hf_to_gguf.py's MPTModel writes it (no output.weight: tied);
  `metadata` replaces or adds writer fields (name: the GGUFWriter.add_NAME method)."""
  import gguf

  cfg = model.config
  writer = gguf.GGUFWriter(str(path), "mpt")
  fields = dict(vocab_size=cfg.vocab_size, context_length=cfg.max_seq_len, embedding_length=cfg.d_model,
                block_count=cfg.n_layers, feed_forward_length=4 * cfg.d_model, head_count=cfg.n_heads,
                layer_norm_eps=1e-5, max_alibi_bias=cfg.attn_config.alibi_bias_max)
  for name, value in dict(fields, **metadata).items():
    getattr(writer, f"add_{name}")(value)
  names = {"norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output", "norm_2": "ffn_norm",
           "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}
  for name, tensor in model.state_dict().items():
    parts = name.split(".")
    if parts[1] == "blocks":
      gguf_name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
    else:
      gguf_name = {"wte": "token_embd.weight", "norm_f": "output_norm.weight"}.get(parts[1])
    if gguf_name:  # (lm_head: tied)
      writer.add_tensor(gguf_name, tensor.float().numpy())
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
