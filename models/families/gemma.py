"""Gemma 2 and Gemma 3 (text): Llama with (1 + w) RMSNorms before and after attention and MLP, a
GeGLU (tanh) MLP, embeddings times sqrt(D), logits scaled by query_pre_attn_scalar^-1/2, a window
on a pattern of layers, tied embeddings, and GGUF norms stored as 1 + w. Gemma 2: soft-capped
attention and output logits, every other layer windowed. Gemma 3: (1 + w) q/k norms, 5 of each 6
layers windowed, and those layers' own RoPE theta (unscaled)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lminf_jax.errors import UserError
from lminf_jax.models.families.record import HF, Family, GGUFGet, Window, layer_types, layer_windows
from lminf_jax.models.fields import check_fields, whole

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig


def _pattern(n: int, period: int) -> list[str]:
  """Layer types with every `period`-th layer global, the others windowed."""
  return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]


# --- config.json

def _normalize(hf: HF) -> HF:
  """Gemma names its activation hidden_activation (hidden_act too, in older configs)."""
  return {**hf, "hidden_act": hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"}


def _normalize_3(hf: HF) -> HF:
  """As `_normalize`, and the RoPE settings in transformers 4.x's keys: the global layers' in
  `rope_theta` / `rope_parameters`, the windowed layers' theta in `rope_local_base_freq`.
  transformers 5 keeps them per layer type in `rope_parameters`. The windowed layers' RoPE must be
  unscaled. yarn's `truncate` is dropped: transformers reads it from the top of rope_parameters,
  where Gemma 3's settings per layer type never put it (so it is always true)."""
  hf = _normalize(hf)
  params = hf.get("rope_parameters") or {}
  if not isinstance(params, dict):
    raise UserError(f"rope_parameters must be an object, got {params!r}")
  by_type = "full_attention" in params or "sliding_attention" in params
  full = dict(params.get("full_attention") or {}) if by_type else dict(params)
  local = dict(params.get("sliding_attention") or {}) if by_type else {}
  if local.get("rope_type", "default") != "default":
    raise UserError(f"unsupported RoPE scaling {local['rope_type']!r} on the sliding layers (only default)")
  local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
  check_fields({"rope_local_base_freq": local_theta}, (), (), ("rope_local_base_freq",))
  full.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))
  full.pop("truncate", None)
  if isinstance(scaling := hf.get("rope_scaling"), dict):  # (transformers 4.x's key: the global layers')
    hf = {**hf, "rope_scaling": {k: v for k, v in scaling.items() if k != "truncate"}}
  return {**hf, "rope_parameters": full, "rope_local_base_freq": float(local_theta)}


def _window(hf: HF) -> Window:
  return layer_windows(hf, _pattern(hf["num_hidden_layers"], 2))


def _window_3(hf: HF) -> Window:
  return layer_windows(hf, _pattern(hf["num_hidden_layers"], hf.get("sliding_window_pattern", 6)))


def _fields(hf: HF) -> dict[str, Any]:
  check_fields(hf, (), (), ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"))
  softcap = lambda key: None if hf.get(key) is None else float(hf[key])  # noqa: E731
  return dict(hidden_act="gelu_tanh", norm_offset=True, post_norms=True, embed_scale=math.sqrt(hf["hidden_size"]),
              query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
              attn_softcap=softcap("attn_logit_softcapping"), final_softcap=softcap("final_logit_softcapping"))


def _fields_3(hf: HF) -> dict[str, Any]:
  """Gemma 2's, and the windowed layers' RoPE theta (none where no layer is windowed)."""
  return {**_fields(hf), "local_rope_theta": hf["rope_local_base_freq"] if _window_3(hf)[0] else None}


def _hf_keys(config: LlamaConfig, hf: HF) -> HF:
  """Gemma's keys; layer_types always (its absence means the family's default pattern, not "every
  layer" or "no layer")."""
  hf = {k: v for k, v in hf.items() if k != "hidden_act"}
  windowed = config.window_layers or (config.sliding_window is not None,) * config.num_layers
  return {**hf, "layer_types": layer_types(windowed), "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": whole(config.query_pre_attn_scalar),
          "attn_logit_softcapping": config.attn_softcap, "final_logit_softcapping": config.final_softcap,
          "sliding_window": config.sliding_window}


def _hf_keys_3(config: LlamaConfig, hf: HF) -> HF:
  """As `_hf_keys`, with the RoPE per layer type (transformers 5's keys); yarn without truncation refused
  (`_normalize_3`)."""
  if config.rope_scaling.kind == "yarn" and not config.rope_scaling.truncate:
    raise UserError("cannot export: transformers' gemma3_text always truncates yarn's ramp (truncate=false)")
  local = {"rope_type": "default", "rope_theta": config.local_rope_theta or config.rope_theta}
  hf = {**hf, "rope_parameters": {"full_attention": hf["rope_parameters"], "sliding_attention": local},
        "rope_scaling": None}
  del hf["rope_theta"]
  return _hf_keys(config, hf)


# --- GGUF

def _gguf_fields(get: GGUFGet, tensors: Mapping[str, Any], hf: HF, path: Path, arch: str = "gemma2",
                 period: int = 2, big: int = 46) -> HF:
  """The fields as llama.cpp reads them: the windowed layers all but every `period`-th unless
  `sliding_window_pattern` says; the query scale 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for
  the 27B models (`big` layers)."""
  n, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
  if not all(isinstance(x, int) and x > 0 for x in (n, heads, hidden)):
    raise UserError(f"{path} lacks {arch}.block_count, attention.head_count or embedding_length (or one is not "
                    f"positive)")
  head_dim = hf["head_dim"] or hidden // heads
  pattern = get("attention.sliding_window_pattern", period)
  if isinstance(pattern, list):
    types = ["sliding_attention" if w else "full_attention" for w in pattern]
  elif isinstance(pattern, int) and pattern > 0:
    types = _pattern(n, pattern)
  else:
    raise UserError(f"{path}: {arch}.attention.sliding_window_pattern must be a positive integer or a list, got "
                    f"{pattern!r}")
  return {"hidden_activation": "gelu_pytorch_tanh", "layer_types": types,
          "query_pre_attn_scalar": hidden // heads if n == big else head_dim,
          "attn_logit_softcapping": get("attn_logit_softcapping"),
          "final_logit_softcapping": get("final_logit_softcapping")}


def _gguf_fields_3(get: GGUFGet, tensors: Mapping[str, Any], hf: HF, path: Path) -> HF:
  """As `_gguf_fields`, and the windowed layers at RoPE theta 10000 (or `rope.freq_base_swa`), the
  global ones at rope.freq_base with the scaling."""
  fields = _gguf_fields(get, tensors, hf, path, arch="gemma3", period=6, big=62)
  full = {"rope_type": "default", "rope_theta": hf["rope_theta"], **hf.get("rope_scaling", {})}
  local = {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)}
  return {**fields, "rope_parameters": {"full_attention": full, "sliding_attention": local}, "rope_scaling": None}


GEMMA2 = Family(
    model_type="gemma2", hf_architecture="Gemma2ForCausalLM", normalize=_normalize, hf_act="gelu_pytorch_tanh",
    tie_embeddings=True, sliding_window=_window, config_fields=_fields, hf_keys=_hf_keys,
    # (its post_attention_layernorm is the attention output's; pre_feedforward_layernorm the MLP input's)
    renames=(("model.layers.{}.post_attention_layernorm.weight", "model.layers.{}.post_attn_norm.weight"),
             ("model.layers.{}.pre_feedforward_layernorm.weight", "model.layers.{}.post_attention_layernorm.weight"),
             ("model.layers.{}.post_feedforward_layernorm.weight", "model.layers.{}.post_mlp_norm.weight")),
    gguf_arch="gemma2", gguf_half_split_rope=True, gguf_fields=_gguf_fields,
    # (to the names of its Hugging Face checkpoints, which `renames` maps)
    gguf_tensors=(("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
                  ("post_ffw_norm", "post_feedforward_layernorm")))
GEMMA3 = dataclasses.replace(
    GEMMA2, model_type="gemma3_text", hf_architecture="Gemma3ForCausalLM", normalize=_normalize_3, qk_norm=True,
    sliding_window=_window_3, config_fields=_fields_3, hf_keys=_hf_keys_3, gguf_arch="gemma3",
    gguf_fields=_gguf_fields_3)
