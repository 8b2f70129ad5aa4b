"""Flax Llama models (installed as `lminf_jax.models`)."""

from lminf_jax.models.config import LlamaConfig, RopeScaling
from lminf_jax.models.llama import Llama

__all__ = ["Llama", "LlamaConfig", "RopeScaling"]
