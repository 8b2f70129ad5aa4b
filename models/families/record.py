"""The `Family` record: what the shared readers and writers ask of a model family, and the
helpers its file builds it from.

The shared code (`LlamaConfig.from_hf` / `to_hf`, `convert/hf.py`, `convert/gguf_file.py`) reads
a Llama-shaped config.json (transformers' Llama keys) and asks the record only for what differs.
A family whose config.json has a shape of its own (MPT) gives whole readers and a writer instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lminf_jax.errors import UserError

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig

HF = dict[str, Any]  # a config.json
Window = tuple[int | None, tuple[bool, ...]]  # (sliding window, the layers that keep it; (): every layer)
GGUFGet = Callable[..., Any]  # get(key, default=None): the file's `<arch>.<key>` metadata
# (get, the file's tensors by name, the config.json fields read so far, the file) -> config.json fields
GGUFReader = Callable[[GGUFGet, Mapping[str, Any], HF, Path], HF]


def same(hf: HF) -> HF:
  return hf


def no_window(hf: HF) -> Window:
  return None, ()


def no_fields(hf: HF) -> dict[str, Any]:
  return {}


def same_keys(config: LlamaConfig, hf: HF) -> HF:
  return hf


def no_gguf_fields(get: GGUFGet, tensors: Mapping[str, Any], hf: HF, path: Path) -> HF:
  return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
  """One model_type: its names, config.json both ways, tensor names and its GGUF reading.
  Defaults are Llama's."""

  model_type: str  # config.json's model_type (and LlamaConfig.model_type)
  hf_architecture: str  # config.json's architectures[0]: the transformers class that runs it
  # --- config.json -> LlamaConfig (Llama-shaped config.json; LlamaConfig.from_hf asks these)
  normalize: Callable[[HF], HF] = same  # config.json in the Llama keys, before anything is read (Gemma)
  hf_act: str = "silu"  # the activation (config.json's hidden_act) its transformers class runs; others refused
  # Which projections config.json's attention_bias biases: "attention_bias" q, k, v and o; "qkv" q, k, v
  # always, o never (Qwen2); "none": no o bias, and its transformers class takes no bias (export refuses one).
  bias: Literal["attention_bias", "qkv", "none"] = "attention_bias"
  qk_norm: bool = False  # q and k heads are RMS-normed before RoPE (Qwen3, Gemma 3)
  tie_embeddings: bool = False  # tie_word_embeddings when config.json does not say
  partial_rotary: bool = False  # reads partial_rotary_factor (Phi-3); otherwise RoPE rotates whole heads
  rope_aliases: tuple[tuple[str, str], ...] = ()  # (an older rope_type name, ours) (Phi-3's su, yarn)
  rope_types: tuple[str, ...] | None = None  # the rope_types its transformers class takes (None: all we read)
  sliding_window: Callable[[HF], Window] = no_window  # the window and its layers, from config.json
  config_fields: Callable[[HF], dict[str, Any]] = no_fields  # LlamaConfig fields beyond the Llama ones
  # --- LlamaConfig -> config.json (LlamaConfig.to_hf): the family's keys on the Llama ones, and its refusals
  hf_keys: Callable[[LlamaConfig, HF], HF] = same_keys
  # --- A config.json of the family's own shape (MPT): whole readers and writer instead of the above
  from_hf: Callable[[HF], dict[str, Any]] | None = None  # config.json -> LlamaConfig fields
  to_hf: Callable[[LlamaConfig], HF] | None = None  # LlamaConfig -> config.json
  from_gguf: GGUFReader | None = None  # GGUF metadata -> config.json (given vocab, tying, bos and eos ids)
  # --- Tensors (convert/hf.py; "{}" is a layer index)
  renames: tuple[tuple[str, str], ...] = ()  # (its checkpoints' name, the Llama name), both ways
  fused: bool = False  # its checkpoints stack q/k/v in qkv_proj and gate/up in gate_up_proj
  mlp_width_from_tensors: bool = False  # the MLP width is the tensors' where config.json disagrees (MPT)
  # --- GGUF (convert/gguf_file.py)
  gguf_arch: str | None = None  # general.architecture; None: no GGUF reading
  gguf_tensors: tuple[tuple[str, str], ...] = ()  # (a GGUF layer tensor, its HF name), over the shared table
  gguf_half_split_rope: bool = False  # q/k rows stored as in HF (llama.cpp's NEOX RoPE): not un-permuted
  gguf_fields: GGUFReader = no_gguf_fields  # config.json fields beyond the Llama ones, from the metadata


TRANSFORMERS_WINDOW = 4096  # the sliding_window of transformers' Gemma 2/3 and Qwen2/3 configs when config.json has none


def layer_windows(hf: HF, default: list[str]) -> Window:
  """The window of config.json's `layer_types` ("sliding_attention" / "full_attention" per layer;
  `default` when absent) and `sliding_window` (transformers' default when absent), as transformers reads them."""
  n = hf["num_hidden_layers"]
  kinds = hf.get("layer_types") or default
  if not isinstance(kinds, list) or len(kinds) != n or not set(kinds) <= {"sliding_attention", "full_attention"}:
    raise UserError(f"layer_types must list {n} of sliding_attention / full_attention, got {kinds!r}")
  if "sliding_attention" not in kinds:
    return None, ()
  window = hf.get("sliding_window", TRANSFORMERS_WINDOW)
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:  # (transformers fails on these too)
    raise UserError(f"layer_types has sliding_attention layers, so sliding_window must be a positive integer, got "
                    f"{window!r}")
  windowed = tuple(t == "sliding_attention" for t in kinds)
  return window, (() if all(windowed) else windowed)


def layer_types(windowed: tuple[bool, ...]) -> list[str]:
  """`layer_windows`' inverse: config.json's layer_types of the windowed layers."""
  return ["sliding_attention" if w else "full_attention" for w in windowed]
