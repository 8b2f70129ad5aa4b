"""GGUF files (llama.cpp) -> config and JAX params (the tokenizer: `gguf_tokenizer.py`).

Reading and dequantisation use the `gguf` package. llama.cpp stores q/k projection rows
permuted for its interleaved RoPE; we undo that to get back the Hugging Face half-split layout.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lminf_jax.convert.hf import assemble_params
from lminf_jax.errors import UserError
from lminf_jax.util.files import readable_file
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.families import Family, family, family_of_gguf_arch

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Layer tensors; a family's `gguf_tensors` add to them or replace some.
_GGUF_LAYER_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
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
  """The config of a GGUF file: its metadata as the config.json fields its family reads."""
  arch = _field(reader, "general.architecture")
  fam = family_of_gguf_arch(arch, path)
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
  tensors = {t.name: t for t in reader.tensors}
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  shared = {"vocab_size": get("vocab_size") or (len(tokens.data) if tokens else None),
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": _end_ids(reader)}
  reads = fam.from_gguf or functools.partial(_llama_fields, fam)
  hf = reads(get, tensors, shared, path)
  try:
    return LlamaConfig.from_hf(hf)
  except UserError as e:
    raise UserError(f"{path} (as Hugging Face config fields): {e}") from None


def _llama_fields(fam: Family, get, tensors: dict, shared: dict, path: Path) -> dict:
  """The Llama config.json fields of a GGUF's metadata (with `shared`: the vocab, tying, bos and
  eos ids), and its family's `gguf_fields`; UserError naming what it lacks."""
  num_heads = get("attention.head_count")
  hf = {
      "model_type": fam.model_type,
      "vocab_size": shared["vocab_size"],
      "hidden_size": get("embedding_length"),
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": num_heads,
      "num_key_value_heads": get("attention.head_count_kv", num_heads),
      # absent: hidden // heads (with partial RoPE, rope.dimension_count is the rotated part of a head)
      "head_dim": get("attention.key_length") or (None if fam.partial_rotary else get("rope.dimension_count")),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
      "rope_theta": get("rope.freq_base", 10000.0),
      "max_position_embeddings": get("context_length", 2048),
      "tie_word_embeddings": shared["tie_word_embeddings"],
      "attention_bias": "blk.0.attn_q.bias" in tensors,  # (as the family reads it: Qwen2's q/k/v always have one)
      "bos_token_id": shared["bos_token_id"],
      "eos_token_id": shared["eos_token_id"],
      "sliding_window": get("attention.sliding_window"),  # absent: no window
  }
  if (kind := get("rope.scaling.type")) not in (None, "none"):
    hf["rope_scaling"] = {"rope_type": kind, "factor": get("rope.scaling.factor", 1.0)}
    if kind == "yarn":
      hf["rope_scaling"].update(_yarn_fields(get, path))
  hf.update(fam.gguf_fields(get, tensors, hf, path))
  optional = ("head_dim", "bos_token_id", "eos_token_id", "sliding_window", "attn_logit_softcapping",
              "final_logit_softcapping", "rope_scaling")
  missing = [k for k, v in hf.items() if v is None and k not in optional]
  if missing:
    raise UserError(f"{path} lacks metadata for {', '.join(missing)}")
  return hf


def _yarn_fields(get, path: Path) -> dict:
  """YaRN's config.json fields of llama.cpp's keys (absent: transformers' defaults); keys without a
  transformers counterpart (attention and extrapolation factors, log multiplier) are refused."""
  unread = [key for key in ("attn_factor", "yarn_ext_factor", "yarn_attn_factor", "yarn_log_multiplier")
            if get(f"rope.scaling.{key}") is not None]
  if unread:
    raise UserError(f"{path}: YaRN's rope.scaling.{unread[0]} is not read (no transformers counterpart)")
  fields = {"original_max_position_embeddings": get("rope.scaling.original_context_length"),
            "beta_fast": get("rope.scaling.yarn_beta_fast"), "beta_slow": get("rope.scaling.yarn_beta_slow")}
  return {name: value for name, value in fields.items() if value is not None}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: per head, interleaved pairs -> two halves."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, config: LlamaConfig, path: Path) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array in HF layout) for every tensor, dequantised one at a time."""
  from gguf.quants import dequantize

  fam = family(config.model_type)
  names = {**_GGUF_LAYER_TO_HF, **dict(fam.gguf_tensors)}
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
    if not fam.gguf_half_split_rope and kind in ("attn_q", "attn_k"):
      array = _unpermute(array, config.num_heads if kind == "attn_q" else config.num_kv_heads)
    if config.norm_offset and tensor.name.endswith("norm.weight"):
      array = array - 1  # (llama.cpp stores Gemma's norm scales as 1 + w)
    yield name, array


def load_gguf(path: Path, param_dtype: str = "float32", on_device: bool = False,
              mesh=None) -> tuple[LlamaConfig, dict]:
  """GGUF file -> (config, params): numpy arrays, or device arrays (`assemble_params`)."""
  reader = open_gguf(path)
  config = gguf_config(reader, path).replace(param_dtype=param_dtype)
  return config, assemble_params(config, iter_gguf_tensors(reader, config, path), on_device, mesh)

