"""Model configuration: a frozen dataclass built from a Hugging Face config dict."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from lminf_jax.errors import UserError
from lminf_jax.models.families import DEFAULT, family
from lminf_jax.models.families.record import layer_types
from lminf_jax.models.fields import check_fields, hf_token_ids, token_ids
from lminf_jax.models.rope_scaling import RopeScaling, hf_rope, read_rope_scaling
from lminf_jax.util.limits import gib

DTYPES = ("float32", "bfloat16")
MAX_PARAMS = 10**12  # far above any model this runs; a bigger config is a typo (or a hostile file)

# Integer (positive, at most INT32_MAX) and float (positive, finite) fields, by the names of a
# Hugging Face config.json and of LlamaConfig (a checkpoint's config.json).
_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
_OPTIONAL_INTS = ("max_position_embeddings", "sliding_window")
_FLOATS = ("rms_norm_eps", "rope_theta")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3), or one that differs from it in
  the parts named below (MPT: ALiBi, LayerNorm, a GELU MLP; Gemma 2 and 3: the norms, scales,
  soft-caps, per-layer windows and, Gemma 3, the windowed layers' own RoPE theta).

  `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of
  activations; softmax and RMSNorm statistics are always float32.
  """

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-6  # every norm's epsilon (LayerNorm's too)
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  partial_rotary_factor: float = 1.0  # RoPE rotates the first int(H * this) dims of each head (Phi-3)
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3)
  alibi_bias_max: float | None = None  # ALiBi with MPT's slopes for this bias max, instead of RoPE (MPT)
  layer_norm: bool = False  # LayerNorm without bias instead of RMSNorm (MPT)
  hidden_act: str = "silu"  # the MLP's activation: silu, gelu (exact, MPT) or gelu_tanh (Gemma)
  gated_mlp: bool = True  # down(act(gate x) * up x); False: down(act(up x)) (MPT)
  norm_offset: bool = False  # RMSNorm scales by 1 + w, in float32 (Gemma)
  post_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2 and 3)
  embed_scale: float = 1.0  # embeddings are multiplied by it (Gemma: sqrt(D))
  query_pre_attn_scalar: float | None = None  # logits scaled by its -1/2 power instead of H's (Gemma)
  attn_softcap: float | None = None  # attention logits soft-capped: cap * tanh(s / cap) (Gemma 2)
  final_softcap: float | None = None  # output logits soft-capped (Gemma 2)
  local_rope_theta: float | None = None  # the windowed layers' RoPE theta, unscaled (Gemma 3); None: rope_theta
  model_type: str = DEFAULT.model_type  # its family (lminf_jax.models.families)
  sliding_window: int | None = None  # each query sees only its last sliding_window keys (Mistral v0.1)
  window_layers: tuple[bool, ...] = ()  # the layers that keep sliding_window (Gemma, Qwen2); empty: every layer
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()  # generation ends at any of them (HF: generation_config.json's when given)
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    if (n := self.num_params()) > MAX_PARAMS:
      raise UserError(f"the config describes {n:.3g} parameters ({gib(4 * n)} as float32), "
                      f"more than the limit of {MAX_PARAMS:.0e}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_attention_heads {self.num_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_kv_heads}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
    if self.hidden_act not in ("silu", "gelu", "gelu_tanh"):
      raise UserError(f"unsupported hidden_act {self.hidden_act!r} (silu, gelu or gelu_tanh)")
    if self.window_layers and (len(self.window_layers) != self.num_layers or not self.sliding_window):
      raise UserError(f"window_layers must name all {self.num_layers} layers and come with a sliding_window")
    if self.local_rope_theta is not None and not self.sliding_window:
      raise UserError("local_rope_theta needs windowed layers (a sliding_window)")

  def num_params(self) -> int:
    """The number of parameters (computed from the sizes, nothing allocated)."""
    d, h, n, k = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
    bias = (n + 2 * k) * h * self.qkv_bias + d * self.o_bias
    mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
    layer = 2 * d * h * (n + k) + bias + 2 * h * self.qk_norm + mlp + (4 if self.post_norms else 2) * d
    return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

  @property
  def rotary_dim(self) -> int:  # R
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def heads_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  def resolve_attention(self, spec):
    """`spec` with this model's defaults (attention.resolve): n_local = the training length, and
    Dense = the model's sliding window, if it has one. With window_layers, the windowed layers
    keep the window and the others run the method (`PerLayer`; where every layer is windowed,
    the window alone)."""
    from lminf_jax.attention import resolve
    from lminf_jax.attention.per_layer import PerLayer

    if not self.window_layers:
      return resolve(spec, self.max_position_embeddings, self.sliding_window)
    if isinstance(spec, PerLayer):
      return spec
    if not any(self.window_layers):  # (one kind of layer: no PerLayer)
      return resolve(spec, self.max_position_embeddings)
    per_layer = PerLayer(resolve(spec, self.max_position_embeddings), self.sliding_window, self.window_layers)
    return per_layer.sliding() if all(self.window_layers) else per_layer

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of this model (what `from_hf` reads back to it, with
    RoPE settings in both transformers 5's and 4.x's keys). Raises UserError for a combination
    that the model_type's transformers class cannot express (e.g. a GGUF llama with a window)."""
    fam = family(self.model_type)
    if fam.to_hf is not None:
      return fam.to_hf(self)
    bias_ok = {"attention_bias": self.qkv_bias == self.o_bias, "qkv": self.qkv_bias and not self.o_bias,
               "none": not (self.qkv_bias or self.o_bias)}[fam.bias]
    if not bias_ok:
      raise UserError(f"cannot export: transformers' {fam.model_type} has no form for q/k/v bias={self.qkv_bias} "
                      f"with o bias={self.o_bias}")
    theta, rope = hf_rope(self)
    if fam.rope_types is not None and rope["rope_type"] not in fam.rope_types:
      raise UserError(f"cannot export: transformers' {fam.model_type} takes no rope_type {rope['rope_type']} "
                      f"(only {', '.join(fam.rope_types)})")
    hf = {
        "architectures": [fam.hf_architecture], "model_type": fam.model_type, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": fam.hf_act,
        "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
        "eos_token_id": hf_token_ids(self.eos_token_ids),
        "rope_parameters": rope, "rope_theta": theta,
        "rope_scaling": None if rope["rope_type"] == "default" else
                        {k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": self.param_dtype,
    }
    if fam.bias == "attention_bias":
      hf["attention_bias"] = self.qkv_bias
    if self.window_layers:
      hf["layer_types"] = layer_types(self.window_layers)
    hf = fam.hf_keys(self, hf)
    if self.partial_rotary_factor != 1 and not fam.partial_rotary:
      raise UserError(f"cannot export: transformers' {fam.model_type} rotates whole heads "
                      f"(partial_rotary_factor {self.partial_rotary_factor})")
    return hf

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
    """From `to_dict`'s output (a checkpoint's config.json)."""
    check_fields(d, _INTS, _OPTIONAL_INTS, _FLOATS)
    d = dict(d)
    rope = dict(d.get("rope_scaling", {}))
    for name in ("short_factor", "long_factor"):  # (JSON lists)
      rope[name] = tuple(rope.get(name, ()))
    d["rope_scaling"] = RopeScaling(**rope)
    d["eos_token_ids"] = token_ids(d.get("eos_token_ids"))
    d["window_layers"] = tuple(d.get("window_layers", ()))
    return cls(**d)

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
    """Builds the config from a Hugging Face `config.json` dict (transformers 4.x or 5.x): the
    Llama keys, and what its family (`lminf_jax.models.families`) reads beyond them."""
    fam = family(hf.get("model_type"))
    if fam.from_hf is not None:
      return cls(**fam.from_hf(hf))
    hf = fam.normalize(hf)
    act = hf.get("hidden_act", "silu")
    if act != fam.hf_act:
      raise UserError(f"unsupported hidden_act {act!r} for {fam.model_type}")
    if hf.get("use_bidirectional_attention"):
      raise UserError("unsupported use_bidirectional_attention=true (an encoder)")
    if hf.get("mlp_bias"):
      raise UserError("unsupported mlp_bias=True")
    check_fields(hf, _HF_INTS, _HF_OPTIONAL_INTS, _FLOATS)
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    if not head_dim:
      raise UserError(f"hidden_size {hf['hidden_size']} is smaller than num_attention_heads {num_heads}")
    rope = _rope_dict(hf)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    check_fields({"rope_theta": theta}, (), (), ("rope_theta",))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) if fam.partial_rotary else 1.0
    if isinstance(partial, bool) or not isinstance(partial, numbers.Real) or not 0 < partial <= 1 \
        or int(head_dim * partial) % 2:
      raise UserError(f"partial_rotary_factor must be in (0, 1] and rotate an even number of the {head_dim} "
                      f"head dims, got {partial!r}")
    scaling = read_rope_scaling(hf, rope, head_dim, int(head_dim * partial), fam.rope_aliases, fam.rope_types)
    attention_bias = bool(hf.get("attention_bias", False))
    sliding_window, window_layers = fam.sliding_window(hf)
    check_fields({"sliding_window": sliding_window}, (), ("sliding_window",))
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        partial_rotary_factor=float(partial),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_embeddings)),
        qkv_bias=fam.bias == "qkv" or attention_bias,
        o_bias=fam.bias == "attention_bias" and attention_bias,
        qk_norm=fam.qk_norm,
        model_type=fam.model_type,
        sliding_window=sliding_window,
        window_layers=window_layers,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        **fam.config_fields(hf),
    )


def _rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
  """The RoPE settings: transformers 5 keeps theta and scaling in `rope_parameters`, 4.x in
  `rope_theta` / `rope_scaling` (whose `type` is the older name of `rope_type`). A key that both
  give must have one value."""
  parts = {}
  for name in ("rope_scaling", "rope_parameters"):
    part = hf.get(name) or {}
    if not isinstance(part, dict):
      raise UserError(f"{name} must be an object, got {part!r}")
    part = dict(part)
    if "type" in part:
      part.setdefault("rope_type", part.pop("type"))
    parts[name] = part
  scaling, parameters = parts["rope_scaling"], parts["rope_parameters"]
  for key in sorted(scaling.keys() & parameters.keys()):
    if scaling[key] != parameters[key]:
      raise UserError(f"rope_scaling and rope_parameters disagree: {key} {scaling[key]!r} in rope_scaling, "
                      f"{parameters[key]!r} in rope_parameters")
  return {**scaling, **parameters}
