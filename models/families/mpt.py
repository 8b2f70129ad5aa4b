"""MPT (MosaicML): ALiBi instead of RoPE, LayerNorm without bias, a GELU MLP of expansion_ratio *
d_model, no biases, tied embeddings, a fused Wqkv, and tensors and a config.json of its own names
(transformers' `MptConfig`), which this file reads and writes whole. What transformers' MPT does not
run (a prefix LM, q/k LayerNorm, clipped qkv, biases, ...) is refused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lminf_jax.errors import UserError
from lminf_jax.models.families.record import HF, Family, GGUFGet
from lminf_jax.models.fields import check_fields, hf_token_ids, token_ids, whole

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig

# Attention options that this model does not have: (attn_config key, the value it must have).
_REFUSED = (("attn_type", "multihead_attention"), ("alibi", True), ("prefix_lm", False), ("qk_ln", False),
            ("clip_qkv", None), ("softmax_scale", None))


def _from_hf(hf: HF) -> dict[str, Any]:
  check_fields(hf, ("vocab_size", "d_model", "n_heads", "n_layers"), ("max_seq_len", "expansion_ratio"),
               ("layer_norm_epsilon",))
  attn = hf.get("attn_config") or {}
  if not isinstance(attn, dict):
    raise UserError(f"attn_config must be an object, got {attn!r}")
  for key, value in _REFUSED:
    if attn.get(key, value) != value:
      raise UserError(f"unsupported MPT attn_config {key}={attn[key]!r} (only {value!r})")
  if not hf.get("no_bias", True):
    raise UserError("unsupported MPT no_bias=false (biases in its linear and norm layers)")
  if hf.get("logit_scale") is not None:
    raise UserError(f"unsupported MPT logit_scale {hf['logit_scale']!r}")
  if not hf.get("tie_word_embeddings", True):
    raise UserError("unsupported MPT tie_word_embeddings=false")
  d, n = hf["d_model"], hf["n_heads"]
  if d % n:
    raise UserError(f"d_model {d} is not a multiple of n_heads {n}")
  bias_max = attn.get("alibi_bias_max", 8)
  check_fields({"alibi_bias_max": bias_max}, (), (), ("alibi_bias_max",))
  return dict(
      vocab_size=hf["vocab_size"], hidden_size=d, intermediate_size=hf.get("expansion_ratio", 4) * d,
      num_layers=hf["n_layers"], num_heads=n, num_kv_heads=n, head_dim=d // n,
      rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), max_position_embeddings=hf.get("max_seq_len", 2048),
      tie_word_embeddings=True, model_type=MPT.model_type, alibi_bias_max=float(bias_max), layer_norm=True,
      hidden_act="gelu", gated_mlp=False, bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=token_ids(hf.get("eos_token_id")))


def _to_hf(config: LlamaConfig) -> HF:
  ratio = config.intermediate_size // config.hidden_size
  if config.intermediate_size != 4 * config.hidden_size:
    raise UserError(f"cannot export: transformers' mpt has an MLP of 4 * d_model, not {config.intermediate_size}")
  return {"architectures": [MPT.hf_architecture], "model_type": MPT.model_type, "vocab_size": config.vocab_size,
          "d_model": config.hidden_size, "n_heads": config.num_heads, "n_layers": config.num_layers,
          "expansion_ratio": ratio, "max_seq_len": config.max_position_embeddings,
          "layer_norm_epsilon": config.rms_norm_eps, "no_bias": True, "tie_word_embeddings": True,
          "attn_config": {"alibi": True, "alibi_bias_max": whole(config.alibi_bias_max)},
          "bos_token_id": config.bos_token_id, "eos_token_id": hf_token_ids(config.eos_token_ids),
          "dtype": config.param_dtype}


def _from_gguf(get: GGUFGet, tensors: Mapping[str, Any], hf: HF, path: Path) -> HF:
  """The MPT config.json fields llama.cpp's converter read (max_alibi_bias 0 means no ALiBi;
  clamp_kqv is clip_qkv; a kv head count apart from the heads is grouped attention): `_from_hf`
  refuses what it does not support."""
  heads, hidden = get("attention.head_count"), get("embedding_length")
  ffn = get("feed_forward_length")
  if "position_embd.weight" in tensors:
    raise UserError(f"{path}: unsupported MPT with learned position embeddings (position_embd)")
  if not (ffn and hidden and ffn % hidden == 0):
    raise UserError(f"{path}: MPT feed_forward_length {ffn} is not a multiple of embedding_length {hidden}")
  bias_max = get("attention.max_alibi_bias", 0.0)
  return {"model_type": MPT.model_type, "vocab_size": hf["vocab_size"], "d_model": hidden, "n_heads": heads,
          "n_layers": get("block_count"), "max_seq_len": get("context_length"), "expansion_ratio": ffn // hidden,
          "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5),
          "attn_config": {"alibi": bool(bias_max), "alibi_bias_max": bias_max or 8,
                          "clip_qkv": get("attention.clamp_kqv"),
                          "attn_type": "multihead_attention" if get("attention.head_count_kv", heads) == heads
                          else "grouped_query_attention"},
          "tie_word_embeddings": hf["tie_word_embeddings"], "bos_token_id": hf["bos_token_id"],
          "eos_token_id": hf["eos_token_id"]}


MPT = Family(
    model_type="mpt", hf_architecture="MptForCausalLM", from_hf=_from_hf, to_hf=_to_hf, from_gguf=_from_gguf,
    fused=True, mlp_width_from_tensors=True, gguf_arch="mpt", gguf_tensors=(("attn_qkv", "self_attn.qkv_proj"),),  # (its ffn_up: the ungated MLP's)
    renames=(
        ("transformer.wte.weight", "model.embed_tokens.weight"),
        ("transformer.norm_f.weight", "model.norm.weight"),
        ("transformer.blocks.{}.norm_1.weight", "model.layers.{}.input_layernorm.weight"),
        ("transformer.blocks.{}.norm_2.weight", "model.layers.{}.post_attention_layernorm.weight"),
        ("transformer.blocks.{}.attn.Wqkv.weight", "model.layers.{}.self_attn.qkv_proj.weight"),
        ("transformer.blocks.{}.attn.out_proj.weight", "model.layers.{}.self_attn.o_proj.weight"),
        ("transformer.blocks.{}.ffn.up_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
        ("transformer.blocks.{}.ffn.down_proj.weight", "model.layers.{}.mlp.down_proj.weight"),
    ))
