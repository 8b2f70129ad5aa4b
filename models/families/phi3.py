"""Phi-3 (and Phi-4-mini): Llama with fused qkv_proj and gate_up_proj, RoPE on a part of each head
(`partial_rotary_factor`), longrope (its older names su and yarn), a window on every layer when
config.json gives one, and no attention biases in its transformers class. Its GGUF files keep the
longrope factors as tensors and the rotated dims as `rope.dimension_count`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lminf_jax.errors import UserError
from lminf_jax.models.families.record import HF, Family, GGUFGet, Window

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig

_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # longrope's, as GGUF tensors


def _window(hf: HF) -> Window:
  return hf.get("sliding_window"), ()


def _hf_keys(config: LlamaConfig, hf: HF) -> HF:
  partial = config.partial_rotary_factor
  hf = {**hf, "sliding_window": config.sliding_window,
        "rope_parameters": {**hf["rope_parameters"], "partial_rotary_factor": partial},
        "partial_rotary_factor": partial, "pad_token_id": None}
  if config.rope_scaling.kind == "longrope":
    hf["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings
  return hf


def _gguf_fields(get: GGUFGet, tensors: Mapping[str, Any], hf: HF, path: Path) -> HF:
  """The rotated part of a head, and longrope's factors (from tensors) and lengths."""
  hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf["head_dim"] or (hidden // heads if hidden and heads else None)
  rotary = get("rope.dimension_count")
  fields: HF = {"partial_rotary_factor": rotary / head_dim if rotary and head_dim else 1.0}
  factors = [tensors[name] for name in _ROPE_FACTORS if name in tensors]
  if factors:
    if len(factors) != 2:
      raise UserError(f"{path} has only one of {', '.join(_ROPE_FACTORS)}")
    fields["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": np.asarray(factors[0].data, np.float32).tolist(),
        "long_factor": np.asarray(factors[1].data, np.float32).tolist(),
        "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        "attention_factor": get("rope.scaling.attn_factor"),
    }
  return fields


PHI3 = Family(model_type="phi3", hf_architecture="Phi3ForCausalLM", bias="none", partial_rotary=True,
              rope_aliases=(("su", "longrope"), ("yarn", "longrope")), rope_types=("default", "longrope"),
              sliding_window=_window, hf_keys=_hf_keys,
              fused=True, gguf_arch="phi3", gguf_half_split_rope=True, gguf_fields=_gguf_fields,
              # (ffn_up holds gate and up, as gate_up_proj)
              gguf_tensors=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")))
