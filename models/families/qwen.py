"""Qwen2 and Qwen3: Llama with a window (with `use_sliding_window`) on the layers from
`max_window_layers` on, and RoPE stored half-split in GGUF files. Qwen2 biases q, k and v, never
o; Qwen3 RMS-norms each q and k head, and its attention_bias biases all four."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lminf_jax.models.families.record import HF, Family, Window, layer_windows

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig


def _window(hf: HF) -> Window:
  if not hf.get("use_sliding_window"):
    return None, ()
  first = hf.get("max_window_layers", 28)
  return layer_windows(hf, ["sliding_attention" if i >= first else "full_attention"
                            for i in range(hf["num_hidden_layers"])])


def _hf_keys(config: LlamaConfig, hf: HF) -> HF:
  first = (config.window_layers.index(True) if config.window_layers else
           0 if config.sliding_window else config.num_layers)
  return {**hf, "use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
          "max_window_layers": first}


QWEN2 = Family(model_type="qwen2", hf_architecture="Qwen2ForCausalLM", bias="qkv", sliding_window=_window,
               hf_keys=_hf_keys, gguf_arch="qwen2", gguf_half_split_rope=True)
QWEN3 = Family(model_type="qwen3", hf_architecture="Qwen3ForCausalLM", qk_norm=True, sliding_window=_window,
               hf_keys=_hf_keys, gguf_arch="qwen3", gguf_half_split_rope=True)
