"""Mistral: Llama with a sliding window on every layer (v0.1: 4096 when config.json omits it), and
no attention biases in its transformers class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lminf_jax.models.families.record import HF, Family, Window

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig


def _window(hf: HF) -> Window:
  return hf.get("sliding_window", 4096), ()


def _hf_keys(config: LlamaConfig, hf: HF) -> HF:
  return {**hf, "sliding_window": config.sliding_window}


MISTRAL = Family(model_type="mistral", hf_architecture="MistralForCausalLM", bias="none", sliding_window=_window,
                 hf_keys=_hf_keys, gguf_arch="mistral")
