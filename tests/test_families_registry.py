"""The family registry: one file per family. Each family's model_type and GGUF architecture is a
quoted literal in exactly one library file (its own), and the registry answers for unknown ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lminf_jax.errors import UserError
from lminf_jax.models.families import FAMILIES, family, family_of_gguf_arch

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for folder in ("lminf_jax", "models", "convert") for p in (ROOT / folder).rglob("*.py"))
# Names of another namespace that happen to equal a family's: llama.cpp's tokenizer kinds
# (tokenizer.ggml.model "llama": sentencepiece) and pre-tokenizers (tokenizer.ggml.pre "qwen2").
OTHER_NAMESPACES = {("convert/gguf_tokenizer.py", "llama"), ("convert/gguf_tokenizer.py", "qwen2")}


def _names() -> set[str]:
  return {name for f in FAMILIES.values() for name in (f.model_type, f.gguf_arch) if name}


def _files_quoting(name: str) -> list[str]:
  quoted = re.compile(rf"""(["']){re.escape(name)}\1""")
  return [str(p.relative_to(ROOT)) for p in LIBRARY
          if quoted.search(p.read_text()) and (str(p.relative_to(ROOT)), name) not in OTHER_NAMESPACES]


def test_the_scan_sees_the_library():
  assert {"models/families/mpt.py", "convert/hf.py", "lminf_jax/cli/app.py"} <= {
      str(p.relative_to(ROOT)) for p in LIBRARY}
  assert {"mpt", "gemma2", "gemma3_text", "gemma3", "qwen3", "phi3", "llama"} <= _names()


@pytest.mark.parametrize("name", sorted(_names()))
def test_a_family_name_is_quoted_in_its_family_file_only(name):
  files = _files_quoting(name)
  assert len(files) == 1 and files[0].startswith("models/families/") and files[0] != "models/families/__init__.py", \
      f"{name!r} is quoted in {files}"


def test_records_are_keyed_by_their_model_type_and_gguf_archs_are_unique():
  assert all(key == f.model_type for key, f in FAMILIES.items())
  archs = [f.gguf_arch for f in FAMILIES.values() if f.gguf_arch]
  assert len(archs) == len(set(archs))
  assert all(f.hf_architecture.endswith("ForCausalLM") for f in FAMILIES.values())


def test_unknown_names_are_refused_in_one_line_naming_the_supported_ones():
  with pytest.raises(UserError, match=r"^unsupported model_type 'gpt2' \(supported: llama, mistral, .*\)$"):
    family("gpt2")
  with pytest.raises(UserError, match=r"^unsupported model_type \['x'\] \(supported: "):
    family(["x"])
  with pytest.raises(UserError, match=r"^unsupported model_type 'bert' in m\.gguf \(supported: llama, .*\)$"):
    family_of_gguf_arch("bert", Path("m.gguf"))
  assert all(family_of_gguf_arch(f.gguf_arch, Path("m.gguf")) is f for f in FAMILIES.values() if f.gguf_arch)
