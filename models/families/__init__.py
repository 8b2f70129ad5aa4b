"""The model families: `FAMILIES` (model_type -> `Family`), the only list of supported model types.

A family is one file here (its facts: `record.Family`) and one line below; `docs/adding-a-family.md`
says how to add one.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from lminf_jax.errors import UserError
from lminf_jax.models.families import gemma, llama, mistral, mpt, phi3, qwen
from lminf_jax.models.families.record import Family

__all__ = ["DEFAULT", "FAMILIES", "Family", "family", "family_of_gguf_arch"]

FAMILIES = MappingProxyType({f.model_type: f for f in (
    llama.LLAMA,
    mistral.MISTRAL,
    qwen.QWEN2,
    qwen.QWEN3,
    phi3.PHI3,
    mpt.MPT,
    gemma.GEMMA2,
    gemma.GEMMA3,
)})
DEFAULT = llama.LLAMA  # LlamaConfig's model_type when none is given
_BY_GGUF_ARCH = MappingProxyType({f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch})


def family(model_type: object) -> Family:
  """The family of a config.json's model_type; UserError naming the supported ones."""
  if not isinstance(model_type, str) or model_type not in FAMILIES:
    raise UserError(f"unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
  return FAMILIES[model_type]


def family_of_gguf_arch(arch: object, path: Path) -> Family:
  """The family of a GGUF file's general.architecture; UserError naming the file and the supported ones."""
  if not isinstance(arch, str) or arch not in _BY_GGUF_ARCH:
    raise UserError(f"unsupported model_type {arch!r} in {path} (supported: {', '.join(_BY_GGUF_ARCH)})")
  return _BY_GGUF_ARCH[arch]
