"""Model configuration: a frozen dataclass built from a Hugging Face config dict."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from lminf_jax.errors import UserError
from lminf_jax.util.limits import INT32_MAX, gib

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mpt", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
DTYPES = ("float32", "bfloat16")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "mpt": "MptForCausalLM",
                     "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MAX_PARAMS = 10**12  # far above any model this runs; a bigger config is a typo (or a hostile file)

# Integer (positive, at most INT32_MAX) and float (positive, finite) fields, by the names of a
# Hugging Face config.json and of LlamaConfig (a checkpoint's config.json).
_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
_OPTIONAL_INTS = ("max_position_embeddings", "sliding_window")
_FLOATS = ("rms_norm_eps", "rope_theta")


def check_fields(d: Mapping[str, Any], ints: tuple[str, ...], optional_ints: tuple[str, ...] = (),
                 floats: tuple[str, ...] = ()) -> None:
  """Raises UserError naming the field and its value unless each of `ints` is an integer in
  [1, INT32_MAX], each of `optional_ints` too (or absent / null), and each of `floats` present a
  positive finite number."""
  for name in ints + optional_ints:
    value = d.get(name)
    if value is None:
      if name in ints:
        raise UserError(f"the config lacks {name}")
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= INT32_MAX:
      raise UserError(f"{name} must be an integer in [1, {INT32_MAX}], got {value!r}")
  for name in floats:
    value = d.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value) or value <= 0):
      raise UserError(f"{name} must be a positive number, got {value!r}")


def token_ids(value: Any) -> tuple[int, ...]:
  """A Hugging Face eos_token_id (an id, a list of ids or null) as a tuple of ids."""
  ids = value if isinstance(value, (list, tuple)) else (() if value is None else (value,))
  if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in ids):
    raise UserError(f"eos_token_id must be a token id or a list of them, got {value!r}")
  return tuple(int(i) for i in ids)


def hf_token_ids(ids: tuple[int, ...]) -> int | list[int] | None:
  """`token_ids`' inverse as transformers writes it: one id, a list, or null."""
  return ids[0] if len(ids) == 1 else (list(ids) or None)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (Hugging Face `rope_type` names)."""

  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3, longrope
  short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors while max position + 1 <= original
  long_factor: tuple[float, ...] = ()  # longrope: ... beyond it
  attention_factor: float = 1.0  # longrope: cos and sin are multiplied by it


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
  model_type: str = "llama"
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
    Dense = the model's sliding window, if it has one."""
    from lminf_jax.attention import resolve
    from lminf_jax.attention.per_layer import PerLayer

    if not self.window_layers:
      return resolve(spec, self.max_position_embeddings, self.sliding_window)
    if isinstance(spec, PerLayer):
      return spec
    return PerLayer(resolve(spec, self.max_position_embeddings), self.sliding_window, self.window_layers)

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of this model (what `from_hf` reads back to it, with
    RoPE settings in both transformers 5's and 4.x's keys). Raises UserError for a combination
    that the model_type's transformers class cannot express (e.g. a GGUF llama with a window)."""
    mt = self.model_type
    if mt == "mpt":
      return self._to_mpt()
    no_bias = not (self.qkv_bias or self.o_bias)
    bias_ok = {"llama": self.qkv_bias == self.o_bias, "mistral": no_bias, "phi3": no_bias,
               "qwen2": self.qkv_bias and not self.o_bias, "qwen3": self.qkv_bias == self.o_bias,
               "gemma2": self.qkv_bias == self.o_bias, "gemma3_text": self.qkv_bias == self.o_bias}[mt]
    if not bias_ok:
      raise UserError(f"cannot export: transformers' {mt} has no form for q/k/v bias={self.qkv_bias} "
                      f"with o bias={self.o_bias}")
    if self.sliding_window and mt == "llama":
      raise UserError(f"cannot export: transformers' llama has no sliding window ({self.sliding_window})")
    scaling = self.rope_scaling
    rope: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": self.rope_theta}
    if scaling.kind != "default":
      rope["factor"] = scaling.factor
    if scaling.kind == "llama3":
      rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                  original_max_position_embeddings=scaling.original_max_position_embeddings)
    if scaling.kind == "longrope":
      rope.update(short_factor=list(scaling.short_factor), long_factor=list(scaling.long_factor),
                  attention_factor=scaling.attention_factor,
                  original_max_position_embeddings=scaling.original_max_position_embeddings)
    hf = {
        "architectures": [_HF_ARCHITECTURES[mt]], "model_type": mt, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
        "eos_token_id": hf_token_ids(self.eos_token_ids),
        "rope_parameters": rope, "rope_theta": self.rope_theta,
        "rope_scaling": None if scaling.kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": self.param_dtype,
    }
    if mt in ("llama", "qwen3") + GEMMA:
      hf["attention_bias"] = self.qkv_bias
    if self.window_layers:
      hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.window_layers]
    if mt == "gemma3_text":  # (RoPE per layer type)
      local = {"rope_type": "default", "rope_theta": self.local_rope_theta or self.rope_theta}
      hf.update(rope_parameters={"full_attention": rope, "sliding_attention": local}, rope_scaling=None)
      del hf["rope_theta"]
    if mt in GEMMA:
      del hf["hidden_act"]
      hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_whole(self.query_pre_attn_scalar),
                attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap,
                sliding_window=self.sliding_window)
    if mt in ("mistral", "phi3"):
      hf["sliding_window"] = self.sliding_window
    if mt == "phi3":
      rope["partial_rotary_factor"] = self.partial_rotary_factor
      hf.update(partial_rotary_factor=self.partial_rotary_factor, pad_token_id=None)
      if scaling.kind == "longrope":
        hf["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    elif self.partial_rotary_factor != 1:
      raise UserError(f"cannot export: transformers' {mt} rotates whole heads "
                      f"(partial_rotary_factor {self.partial_rotary_factor})")
    if mt in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                max_window_layers=self.window_layers.index(True) if self.window_layers else
                0 if self.sliding_window else self.num_layers)
    return hf

  def _to_mpt(self) -> dict[str, Any]:
    ratio = self.intermediate_size // self.hidden_size
    if self.intermediate_size != 4 * self.hidden_size:
      raise UserError(f"cannot export: transformers' mpt has an MLP of 4 * d_model, not {self.intermediate_size}")
    return {"architectures": [_HF_ARCHITECTURES["mpt"]], "model_type": "mpt", "vocab_size": self.vocab_size,
            "d_model": self.hidden_size, "n_heads": self.num_heads, "n_layers": self.num_layers,
            "expansion_ratio": ratio, "max_seq_len": self.max_position_embeddings,
            "layer_norm_epsilon": self.rms_norm_eps, "no_bias": True, "tie_word_embeddings": True,
            "attn_config": {"alibi": True, "alibi_bias_max": _whole(self.alibi_bias_max)},
            "bos_token_id": self.bos_token_id, "eos_token_id": hf_token_ids(self.eos_token_ids),
            "dtype": self.param_dtype}

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
    """Builds the config from a Hugging Face `config.json` dict (transformers 4.x or 5.x)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UserError(f"unsupported model_type {model_type!r} "
                      f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "mpt":
      return _from_mpt(hf)
    act = hf.get("hidden_act", "silu")
    if model_type in GEMMA:
      act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != ("gelu_pytorch_tanh" if model_type in GEMMA else "silu"):
      raise UserError(f"unsupported hidden_act {act!r} for {model_type}")
    if hf.get("use_bidirectional_attention"):
      raise UserError("unsupported use_bidirectional_attention=true (an encoder)")
    local_theta = None
    if model_type == "gemma3_text":
      hf, local_theta = _gemma3_rope(hf)
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
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) if model_type == "phi3" else 1.0
    if isinstance(partial, bool) or not isinstance(partial, numbers.Real) or not 0 < partial <= 1 \
        or int(head_dim * partial) % 2:
      raise UserError(f"partial_rotary_factor must be in (0, 1] and rotate an even number of the {head_dim} "
                      f"head dims, got {partial!r}")
    scaling = _rope_scaling(hf, rope, head_dim, int(head_dim * partial))
    attention_bias = bool(hf.get("attention_bias", False))
    sliding_window, window_layers = _sliding_window(hf)
    check_fields({"sliding_window": sliding_window}, (), ("sliding_window",))
    gemma = _gemma_fields(hf) if model_type in GEMMA else {}
    if local_theta is not None:
      gemma["local_rope_theta"] = local_theta
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
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in GEMMA)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type in ("llama", "qwen3") + GEMMA and attention_bias,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        model_type=model_type,
        sliding_window=sliding_window,
        window_layers=window_layers,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        **gemma,
    )


# MPT attention options that this model does not have: (key, the value it must have).
_MPT_REFUSED = (("attn_type", "multihead_attention"), ("alibi", True), ("prefix_lm", False), ("qk_ln", False),
                ("clip_qkv", None), ("softmax_scale", None))


def _whole(x: float) -> int | float:
  """x as an int when it is whole (transformers' configs type such fields int)."""
  return int(x) if float(x).is_integer() else x


def _from_mpt(hf: dict[str, Any]) -> LlamaConfig:
  """An MPT config.json (transformers' `MptConfig`): ALiBi, LayerNorm without bias, no biases,
  a GELU MLP of expansion_ratio * d_model, tied embeddings. What transformers' MPT does not
  run (a prefix LM, q/k LayerNorm, clipped qkv, biases, ...) is refused."""
  check_fields(hf, ("vocab_size", "d_model", "n_heads", "n_layers"), ("max_seq_len", "expansion_ratio"),
               ("layer_norm_epsilon",))
  attn = hf.get("attn_config") or {}
  if not isinstance(attn, dict):
    raise UserError(f"attn_config must be an object, got {attn!r}")
  for key, value in _MPT_REFUSED:
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
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=d, intermediate_size=hf.get("expansion_ratio", 4) * d,
      num_layers=hf["n_layers"], num_heads=n, num_kv_heads=n, head_dim=d // n,
      rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), max_position_embeddings=hf.get("max_seq_len", 2048),
      tie_word_embeddings=True, model_type="mpt", alibi_bias_max=float(bias_max), layer_norm=True, hidden_act="gelu",
      gated_mlp=False, bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=token_ids(hf.get("eos_token_id")))


def _rope_scaling(hf: dict[str, Any], rope: dict[str, Any], head_dim: int, rotary_dim: int) -> RopeScaling:
  """The RopeScaling of `rope` (`_rope_dict`), as transformers computes it. longrope (Phi-3; its
  older names "su" and "yarn"): `factor` defaults to max_position_embeddings / original, and
  `attention_factor` to sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1)."""
  kind = rope.get("rope_type", "default")
  if hf["model_type"] == "phi3" and kind in ("su", "yarn"):
    kind = "longrope"
  if kind not in SUPPORTED_ROPE_TYPES:
    raise UserError(f"unsupported rope scaling {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
  try:
    if kind != "longrope":
      return RopeScaling(
          kind=kind,
          factor=float(rope.get("factor", 1.0)),
          low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
          high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
      )
    original = int(rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
    factor = float(rope.get("factor") or hf.get("max_position_embeddings", original) / original)
    attention = rope.get("attention_factor")
    if attention is None:
      attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = {name: tuple(float(x) for x in rope[name]) for name in ("short_factor", "long_factor")}
  except (TypeError, ValueError, KeyError) as e:
    raise UserError(f"bad rope scaling {rope}: {type(e).__name__}: {e}") from None
  for name, values in factors.items():
    if len(values) != rotary_dim // 2 or not all(math.isfinite(x) and x > 0 for x in values):
      raise UserError(f"longrope {name} must hold {rotary_dim // 2} positive numbers (rotary dim {rotary_dim} of "
                      f"head_dim {head_dim}), got {len(values)}")
  return RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=original,
                     attention_factor=float(attention), **factors)


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


def _sliding_window(hf: dict[str, Any]) -> tuple[int | None, tuple[bool, ...]]:
  """(window, the layers that keep it; () when every layer does), as transformers reads them:
  Mistral's `sliding_window` (4096 when the key is absent); Phi-3's; Qwen2's and Qwen3's only with
  `use_sliding_window`, on the layers from `max_window_layers` on; Gemma 2's on its
  `layer_types` "sliding_attention" (every other layer from the first by default)."""
  mt, n = hf["model_type"], hf["num_hidden_layers"]
  if mt == "mistral":
    return hf.get("sliding_window", 4096), ()
  if mt == "phi3":
    return hf.get("sliding_window"), ()
  if mt in GEMMA:  # (Gemma 2: every other layer from the first; Gemma 3: 5 of each 6)
    period = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
    default = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
  elif mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    default = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
  else:
    return None, ()
  types = hf.get("layer_types") or default
  if not isinstance(types, list) or len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
    raise UserError(f"layer_types must list {n} of sliding_attention / full_attention, got {types!r}")
  if not hf.get("sliding_window") or "sliding_attention" not in types:
    return None, ()
  windowed = tuple(t == "sliding_attention" for t in types)
  return hf["sliding_window"], (() if all(windowed) else windowed)


def _gemma3_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
  """(hf with the global layers' RoPE as its only RoPE settings, the windowed layers' theta).
  transformers 5 keeps Gemma 3's RoPE per layer type in `rope_parameters`; 4.x has `rope_theta`
  and `rope_scaling` (the global layers') and `rope_local_base_freq`. The windowed layers' RoPE
  must be unscaled."""
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
  return {**hf, "rope_parameters": full}, float(local_theta)


def _gemma_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Gemma 2's and 3's fields of LlamaConfig beyond the Llama ones."""
  check_fields(hf, (), (), ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"))
  softcap = lambda key: None if hf.get(key) is None else float(hf[key])  # noqa: E731
  return dict(hidden_act="gelu_tanh", norm_offset=True, post_norms=True, embed_scale=math.sqrt(hf["hidden_size"]),
              query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
              attn_softcap=softcap("attn_logit_softcapping"), final_softcap=softcap("final_logit_softcapping"))
