"""Llama (1, 2, 3 and 3.x): the family whose config.json, tensor names and GGUF the shared code reads.
Every `Family` default is Llama's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lminf_jax.errors import UserError
from lminf_jax.models.families.record import HF, Family

if TYPE_CHECKING:
  from lminf_jax.models.config import LlamaConfig


def _hf_keys(config: LlamaConfig, hf: HF) -> HF:
  if config.sliding_window:
    raise UserError(f"cannot export: transformers' llama has no sliding window ({config.sliding_window})")
  return hf


LLAMA = Family(model_type="llama", hf_architecture="LlamaForCausalLM", hf_keys=_hf_keys, gguf_arch="llama")
