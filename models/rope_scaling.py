"""RoPE scaling: `RopeScaling`, read from a config.json as transformers' `ROPE_INIT_FUNCTIONS` read it
(`read_rope_scaling`), written back (`hf_rope`), and put on any RoPE model zero-shot (`with_rope_scaling`).

Kinds, by transformers' `rope_type` names: default, linear, llama3, longrope, dynamic (Dynamic NTK:
its base grows with a call's length), yarn; and ntk (fixed NTK-aware base scaling, theta *
factor^(R/(R-2)); not a transformers type: exported as default RoPE at that theta). The
frequencies are `lminf_jax.rope`'s; docs/semantics.md#rope-scaling says what each kind does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from lminf_jax.errors import UserError
from lminf_jax.util.limits import INT32_MAX

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "dynamic", "yarn")  # config.json's
OVERRIDE_FIELDS = {  # with_rope_scaling's kinds and the fields each takes
    "ntk": ("factor",),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate",
             "mscale", "mscale_all_dim"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (Hugging Face `rope_type` names, and `ntk`)."""

  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  # llama3, longrope, yarn: the training length; dynamic: the length past which its base grows
  original_max_position_embeddings: int = 8192
  short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors while max position + 1 <= original
  long_factor: tuple[float, ...] = ()  # longrope: ... beyond it
  attention_factor: float = 1.0  # longrope, yarn: cos and sin are multiplied by it
  beta_fast: float = 32.0  # yarn: rotations over the original length above which a frequency is kept
  beta_slow: float = 1.0  # yarn: ... below which it is divided by factor (a linear ramp between)
  truncate: bool = True  # yarn: the ramp's ends rounded out to whole dims

  @property
  def per_call(self) -> bool:
    """Whether the frequencies depend on the call (its largest position), as transformers' per forward."""
    return self.kind in ("longrope", "dynamic")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature term 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_rope_scaling(hf: dict[str, Any], rope: dict[str, Any], head_dim: int, rotary_dim: int,
                      aliases: tuple[tuple[str, str], ...] = (),
                      kinds: tuple[str, ...] | None = None) -> RopeScaling:
  """The RopeScaling of `rope` (config.json's RoPE settings, both key sets merged) as transformers
  reads it; `aliases`: (an older rope_type name, ours) pairs, `kinds`: the rope_types it takes (the
  family's; None: `SUPPORTED_ROPE_TYPES`).

  The original length of llama3 and yarn defaults to max_position_embeddings; dynamic always grows
  from it. longrope (Phi-3): `factor` defaults to max_position_embeddings / original,
  `attention_factor` to sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1). yarn: `factor`
  defaults to max_position_embeddings / original, `attention_factor` to `yarn_mscale(factor,
  mscale) / yarn_mscale(factor, mscale_all_dim)` when both are given and nonzero, else
  `yarn_mscale(factor)`; beta_fast and beta_slow given as 0 or null are 32 and 1."""
  kind = rope.get("rope_type", "default")
  kind = next((ours for older, ours in aliases if older == kind), kind)
  kinds = kinds or SUPPORTED_ROPE_TYPES
  if kind not in kinds:
    raise UserError(f"unsupported rope scaling {kind!r} (supported: {', '.join(kinds)})")
  max_len = hf.get("max_position_embeddings", 2048)
  try:
    if kind == "longrope":
      scaling = _longrope(hf, rope, head_dim, rotary_dim)
    elif kind == "yarn":
      original = int(rope.get("original_max_position_embeddings") or max_len)
      factor = float(max_len / original if rope.get("factor") is None else rope["factor"])
      attention, mscale, mscale_all = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
      if attention is None:
        attention = (yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
                     if mscale and mscale_all else yarn_mscale(factor))
      truncate = rope.get("truncate", True)
      if not isinstance(truncate, bool):
        raise TypeError(f"truncate must be true or false, got {truncate!r}")
      scaling = RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=original,
                            attention_factor=float(attention), beta_fast=float(rope.get("beta_fast") or 32),
                            beta_slow=float(rope.get("beta_slow") or 1), truncate=truncate)
    else:
      scaling = RopeScaling(
          kind=kind,
          factor=float(rope["factor"] if kind == "dynamic" else rope.get("factor", 1.0)),
          low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
          high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(max_len if kind == "dynamic" else
                                               rope.get("original_max_position_embeddings") or max_len),
      )
  except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
    raise UserError(f"bad rope scaling {rope}: {type(e).__name__}: {e}") from None
  check_rope_scaling(scaling, rotary_dim, f"bad rope scaling {rope}")
  return scaling


def _longrope(hf: dict[str, Any], rope: dict[str, Any], head_dim: int, rotary_dim: int) -> RopeScaling:
  original = int(rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
  factor = float(rope.get("factor") or hf.get("max_position_embeddings", original) / original)
  attention = rope.get("attention_factor")
  if attention is None:
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
  factors = {name: tuple(float(x) for x in rope[name]) for name in ("short_factor", "long_factor")}
  for name, values in factors.items():
    if len(values) != rotary_dim // 2 or not all(math.isfinite(x) and x > 0 for x in values):
      raise UserError(f"longrope {name} must hold {rotary_dim // 2} positive numbers (rotary dim {rotary_dim} of "
                      f"head_dim {head_dim}), got {len(values)}")
  return RopeScaling(kind="longrope", factor=factor, original_max_position_embeddings=original,
                     attention_factor=float(attention), **factors)


def check_rope_scaling(scaling: RopeScaling, rotary_dim: int, where: str) -> None:
  """UserError (`where`: what it is about) unless the numbers the kind uses are positive and finite,
  its original length an int32, and, for ntk and dynamic, more than 2 dims rotate (their exponent R/(R-2))."""
  numbers_used = {"factor": scaling.factor, "attention_factor": scaling.attention_factor}
  if scaling.kind == "yarn":
    numbers_used.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
  if scaling.kind == "llama3":
    numbers_used.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
  for name, value in numbers_used.items():
    if not (math.isfinite(value) and value > 0):
      raise UserError(f"{where}: {name} must be a finite number > 0, got {value!r}")
  if not 0 < scaling.original_max_position_embeddings <= INT32_MAX:
    raise UserError(f"{where}: original_max_position_embeddings must be in [1, {INT32_MAX}], got "
                    f"{scaling.original_max_position_embeddings}")
  if scaling.kind in ("ntk", "dynamic") and rotary_dim <= 2:
    raise UserError(f"{where}: {scaling.kind} needs more than 2 rotated dims (its base exponent is R/(R-2)), "
                    f"the model rotates {rotary_dim}")


def with_rope_scaling(config: LlamaConfig, spec: str) -> LlamaConfig:
  """`config` with its RoPE scaling replaced by `spec`, "KIND:NAME=VALUE,...": KIND ntk, linear, dynamic or
  yarn and its fields (`OVERRIDE_FIELDS`; `factor` required), e.g. "yarn:factor=4" or
  "yarn:factor=4,beta_fast=16,truncate=false". original_max_position_embeddings defaults to the
  model's max_position_embeddings, the other fields as in a config.json (`read_rope_scaling`). It
  applies to any RoPE model, whatever its own scaling (which it replaces; Gemma 3: its global layers,
  as transformers' full_attention settings), and combines with any attention method. UserError for an
  ALiBi model (MPT), an unknown kind or field, or a bad value."""
  kind, given = parse_rope_scaling(spec)
  where = f"rope scaling {spec!r}"
  if config.alibi_bias_max is not None:
    raise UserError(f"{where}: {config.model_type} has ALiBi, not RoPE, so no RoPE scaling applies")
  original = given.pop("original_max_position_embeddings", config.max_position_embeddings)
  if kind == "ntk":
    scaling = RopeScaling(kind="ntk", factor=given["factor"])
  else:
    rope = {"rope_type": kind, "original_max_position_embeddings": original, **given}
    scaling = read_rope_scaling({"max_position_embeddings": config.max_position_embeddings}, rope, config.head_dim,
                                config.rotary_dim)
  scaling = dataclasses.replace(scaling, original_max_position_embeddings=original)
  check_rope_scaling(scaling, config.rotary_dim, where)
  return config.replace(rope_scaling=scaling)


def parse_rope_scaling(spec: str) -> tuple[str, dict[str, Any]]:
  """(kind, {field: value}) of a `with_rope_scaling` spec, checked as far as it can be without a model."""
  where = f"rope scaling {spec!r}"
  kind, _, text = spec.partition(":")
  kind = kind.strip()
  if kind not in OVERRIDE_FIELDS:
    raise UserError(f"{where}: unknown kind {kind!r} (kinds: {', '.join(OVERRIDE_FIELDS)}), e.g. yarn:factor=4")
  given: dict[str, Any] = {}
  for item in (part.strip() for part in text.split(",")) if text.strip() else ():
    name, equals, value = item.partition("=")
    name = name.strip()
    if not equals or not name:
      raise UserError(f"{where}: give NAME=VALUE after the colon, comma-separated, got {item!r}")
    if name not in OVERRIDE_FIELDS[kind]:
      raise UserError(f"{where}: {kind} has no field {name!r} (fields: {', '.join(OVERRIDE_FIELDS[kind])})")
    if name in given:
      raise UserError(f"{where}: {name} given twice")
    given[name] = _value(name, value.strip(), where)
  if "factor" not in given:
    raise UserError(f"{where}: give {kind}'s factor, e.g. {kind}:factor=4")
  return kind, given


def _value(name: str, text: str, where: str) -> float | int | bool:
  """A field's value: truncate true or false, original_max_position_embeddings a positive integer,
  the others finite numbers > 0."""
  if name == "truncate":
    if text.lower() not in ("true", "false"):
      raise UserError(f"{where}: truncate must be true or false, got {text!r}")
    return text.lower() == "true"
  if name == "original_max_position_embeddings":
    if not text.isdigit() or not 0 < int(text) <= INT32_MAX:
      raise UserError(f"{where}: {name} must be an integer in [1, {INT32_MAX}], got {text!r}")
    return int(text)
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise UserError(f"{where}: {name} must be a finite number > 0, got {text!r}")
  return value


def hf_rope(config: LlamaConfig) -> tuple[float, dict[str, Any]]:
  """(rope_theta, rope_parameters) as transformers reads them back to `config`'s frequencies: ntk as
  default RoPE at its scaled theta. UserError for dynamic scaling from a length other than
  max_position_embeddings (transformers' dynamic always grows from it)."""
  scaling, theta = config.rope_scaling, config.rope_theta
  if scaling.kind == "ntk":
    theta = theta * scaling.factor ** (config.rotary_dim / (config.rotary_dim - 2))
    return theta, {"rope_type": "default", "rope_theta": theta}
  rope: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": theta}
  if scaling.kind != "default":
    rope["factor"] = scaling.factor
  if scaling.kind in ("llama3", "longrope", "yarn"):
    rope["original_max_position_embeddings"] = scaling.original_max_position_embeddings
  if scaling.kind == "llama3":
    rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
  if scaling.kind == "longrope":
    rope.update(short_factor=list(scaling.short_factor), long_factor=list(scaling.long_factor))
  if scaling.kind in ("longrope", "yarn"):
    rope["attention_factor"] = scaling.attention_factor
  if scaling.kind == "yarn":
    rope.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
  if scaling.kind == "dynamic" and scaling.original_max_position_embeddings != config.max_position_embeddings:
    raise UserError(f"cannot export: transformers' dynamic scaling grows from max_position_embeddings "
                    f"({config.max_position_embeddings}), not from {scaling.original_max_position_embeddings}")
  return theta, rope
