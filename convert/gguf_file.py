"""GGUF files (llama.cpp) -> config and JAX params (the tokenizer: `gguf_tokenizer.py`).

Reading and dequantisation use the `gguf` package. llama.cpp stores q/k projection rows
permuted for its interleaved RoPE; we undo that to get back the Hugging Face half-split layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lminf_jax.convert.hf import assemble_params
from lminf_jax.errors import UserError
from lminf_jax.util.files import readable_file
from lminf_jax.models.config import LlamaConfig

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# Phi-3 stores fused projections: attn_qkv, and ffn_up holding gate and up (llama.cpp splits it in half).
_PHI3_LAYER_TO_HF = {**_GGUF_LAYER_TO_HF, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# MPT: a fused attn_qkv (its ffn_up is the ungated MLP's). Gemma: norms after attention and MLP too,
# named as in its Hugging Face checkpoints (convert/hf.py renames them).
_GEMMA_LAYER_TO_HF = {**_GGUF_LAYER_TO_HF, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_LAYER_TO_HF = {"phi3": _PHI3_LAYER_TO_HF, "mpt": {**_GGUF_LAYER_TO_HF, "attn_qkv": "self_attn.qkv_proj"},
                "gemma2": _GEMMA_LAYER_TO_HF, "gemma3_text": _GEMMA_LAYER_TO_HF}
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mpt", "gemma2", "gemma3")
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # GGUF architecture -> model_type, where they differ
# stored as in Hugging Face (llama.cpp's NEOX rope): no q/k permutation
_HALF_SPLIT_ROPE = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # Phi-3's longrope, as tensors
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path):
  import gguf

  readable_file(path)
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # the reader raises ValueError, IndexError, ... on bad bytes
    raise UserError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _end_ids(reader) -> list[int]:
  """The tokens generation ends at, as llama.cpp reads them: end of text, of turn, of message."""
  ids = (_field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom"))
  return list(dict.fromkeys(i for i in ids if i is not None))


def gguf_config(reader, path: Path) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHS:
    raise UserError(f"unsupported model_type {arch!r} in {path} (supported: {', '.join(GGUF_ARCHS)})")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  if arch == "mpt":
    return _mpt_config(reader, path, get, names)
  num_heads = get("attention.head_count")
  hidden = get("embedding_length")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  hf = {
      "model_type": _MODEL_TYPES.get(arch, arch),
      "vocab_size": get("vocab_size") or (len(tokens.data) if tokens else None),
      "hidden_size": hidden,
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": num_heads,
      "num_key_value_heads": get("attention.head_count_kv", num_heads),
      # absent: hidden // heads (Phi-3's rope.dimension_count is the rotated part of a head)
      "head_dim": get("attention.key_length") or (get("rope.dimension_count") if arch != "phi3" else None),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
      "rope_theta": get("rope.freq_base", 10000.0),
      "max_position_embeddings": get("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names and arch != "qwen2",  # (qwen2's is implied)
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _end_ids(reader),
      "sliding_window": get("attention.sliding_window"),  # absent: no window
  }
  if (kind := get("rope.scaling.type")) not in (None, "none"):
    hf["rope_scaling"] = {"rope_type": kind, "factor": get("rope.scaling.factor", 1.0)}
  if arch == "phi3":
    head_dim = hf["head_dim"] or (hidden // num_heads if hidden and num_heads else None)
    rotary = get("rope.dimension_count")
    hf["partial_rotary_factor"] = rotary / head_dim if rotary and head_dim else 1.0
    factors = {t.name: t for t in reader.tensors if t.name in _ROPE_FACTORS}
    if factors:
      if len(factors) != 2:
        raise UserError(f"{path} has only one of {', '.join(_ROPE_FACTORS)}")
      hf["rope_scaling"] = {
          "rope_type": "longrope",
          "short_factor": np.asarray(factors[_ROPE_FACTORS[0]].data, np.float32).tolist(),
          "long_factor": np.asarray(factors[_ROPE_FACTORS[1]].data, np.float32).tolist(),
          "original_max_position_embeddings": get("rope.scaling.original_context_length"),
          "attention_factor": get("rope.scaling.attn_factor"),
      }
  if arch in ("gemma2", "gemma3"):
    hf.update(_gemma_fields(arch, get, hf, path))
  optional = ("head_dim", "bos_token_id", "eos_token_id", "sliding_window", "attn_logit_softcapping",
              "final_logit_softcapping", "rope_scaling")
  missing = [k for k, v in hf.items() if v is None and k not in optional]
  if missing:
    raise UserError(f"{path} lacks metadata for {', '.join(missing)}")
  try:
    return LlamaConfig.from_hf(hf)
  except UserError as e:
    raise UserError(f"{path} (as Hugging Face config fields): {e}") from None


def _gemma_fields(arch: str, get, hf: dict, path: Path) -> dict:
  """Gemma's config fields as llama.cpp reads them: the windowed layers every 2nd (Gemma 2) or all
  but every 6th (Gemma 3) unless `sliding_window_pattern` says; the query scale 1/sqrt(head_dim),
  or 1/sqrt(hidden / heads) for the 27B models (46 or 62 layers); Gemma 3's windowed layers at
  RoPE theta 10000 (or `rope.freq_base_swa`), its global ones at rope.freq_base with the scaling."""
  n, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
  if not all(isinstance(x, int) and x > 0 for x in (n, heads, hidden)):
    raise UserError(f"{path} lacks {arch}.block_count, attention.head_count or embedding_length (or one is not "
                    f"positive)")
  head_dim = hf["head_dim"] or hidden // heads
  pattern = get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
  if isinstance(pattern, list):
    types = ["sliding_attention" if w else "full_attention" for w in pattern]
  elif isinstance(pattern, int) and pattern > 0:
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
  else:
    raise UserError(f"{path}: {arch}.attention.sliding_window_pattern must be a positive integer or a list, got "
                    f"{pattern!r}")
  big = n == {"gemma2": 46, "gemma3": 62}[arch]
  fields = {"hidden_activation": "gelu_pytorch_tanh", "layer_types": types,
            "query_pre_attn_scalar": hidden // heads if big else head_dim,
            "attn_logit_softcapping": get("attn_logit_softcapping"),
            "final_logit_softcapping": get("final_logit_softcapping")}
  if arch == "gemma3":
    full = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
    if "rope_scaling" in hf:
      full.update(hf["rope_scaling"])
    local = {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)}
    fields.update(rope_parameters={"full_attention": full, "sliding_attention": local}, rope_scaling=None)
  return fields


def _mpt_config(reader, path: Path, get, names: set[str]) -> LlamaConfig:
  """An MPT GGUF's config, as the MPT config.json fields llama.cpp's converter read it from
  (max_alibi_bias 0 means no ALiBi; clamp_kqv is clip_qkv; a kv head count apart from the heads
  is grouped attention): LlamaConfig.from_hf refuses what it does not support."""
  heads, hidden = get("attention.head_count"), get("embedding_length")
  ffn = get("feed_forward_length")
  if "position_embd.weight" in names:
    raise UserError(f"{path}: unsupported MPT with learned position embeddings (position_embd)")
  if not (ffn and hidden and ffn % hidden == 0):
    raise UserError(f"{path}: MPT feed_forward_length {ffn} is not a multiple of embedding_length {hidden}")
  bias_max = get("attention.max_alibi_bias", 0.0)
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  hf = {"model_type": "mpt", "vocab_size": get("vocab_size") or (len(tokens.data) if tokens else None),
        "d_model": hidden, "n_heads": heads, "n_layers": get("block_count"), "max_seq_len": get("context_length"),
        "expansion_ratio": ffn // hidden,
        "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5),
        "attn_config": {"alibi": bool(bias_max), "alibi_bias_max": bias_max or 8,
                        "clip_qkv": get("attention.clamp_kqv"),
                        "attn_type": "multihead_attention" if get("attention.head_count_kv", heads) == heads
                        else "grouped_query_attention"},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _end_ids(reader)}
  try:
    return LlamaConfig.from_hf(hf)
  except UserError as e:
    raise UserError(f"{path} (as Hugging Face config fields): {e}") from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: per head, interleaved pairs -> two halves."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, config: LlamaConfig, path: Path) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array in HF layout) for every tensor, dequantised one at a time."""
  from gguf.quants import dequantize

  names = _LAYER_TO_HF.get(config.model_type, _GGUF_LAYER_TO_HF)
  for tensor in reader.tensors:
    if match := _LAYER.fullmatch(tensor.name):
      layer, kind, suffix = match.groups()
      if kind not in names:
        raise UserError(f"unknown tensor {tensor.name} in {path}")
      name = f"model.layers.{layer}.{names[kind]}.{suffix}"
    elif tensor.name in _GGUF_TO_HF:
      name, kind = _GGUF_TO_HF[tensor.name], None
    else:
      continue  # e.g. rope_freqs or Phi-3's rope factors, which the config holds
    try:
      array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except Exception as e:
      raise UserError(f"{path}: cannot read tensor {tensor.name}: {e}") from None
    expected_rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else None
    if expected_rows is not None and array.shape[0] != expected_rows:
      raise UserError(f"{path}: tensor {tensor.name} is truncated or corrupt")
    if config.model_type not in _HALF_SPLIT_ROPE and kind in ("attn_q", "attn_k"):
      array = _unpermute(array, config.num_heads if kind == "attn_q" else config.num_kv_heads)
    if config.norm_offset and tensor.name.endswith("norm.weight"):
      array = array - 1  # (llama.cpp stores Gemma's norm scales as 1 + w)
    yield name, array


def load_gguf(path: Path, param_dtype: str = "float32") -> tuple[LlamaConfig, dict]:
  """GGUF file -> (config, params as numpy arrays)."""
  reader = open_gguf(path)
  config = gguf_config(reader, path).replace(param_dtype=param_dtype)
  return config, assemble_params(config, iter_gguf_tensors(reader, config, path))

