"""Shared fixtures: tiny Hugging Face model dirs, the real SmolLM2 model, the jargon text."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers, naive_attention

from helpers import SLOW, tiny_hf_model  # noqa: E402

# tests/multidevice needs 8 virtual devices: tests/test_sharding.py runs it in a subprocess.
collect_ignore = [] if os.environ.get("LMINF_MULTIDEVICE") else ["multidevice"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

def pytest_collection_modifyitems(config, items):
  if SLOW:
    return
  skip = pytest.mark.skip(reason="slow: runs with LMINF_SLOW=1 (scripts/slow_tests.sh)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def save_tiny(tmp_path):
  """save_tiny(kind, **overrides) -> (torch model, HF dir with model.safetensors)."""

  def save(kind: str, **overrides):
    model = tiny_hf_model(kind, **overrides)
    out = tmp_path / f"hf_{kind}"
    model.save_pretrained(out)
    return model, out

  return save


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """(config, params, checkpoint dir) of a tiny random Llama (GQA), shared read-only by the tests."""
  from lminf_jax.loading import convert_checkpoint, load

  root = tmp_path_factory.mktemp("tiny_model")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")
  ckpt = convert_checkpoint(root / "hf", root / "ckpt")
  config, params, _ = load(ckpt)
  return config, params, ckpt


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
  from lminf_jax.util.fetch import smollm2_gguf

  return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_ckpt() -> Path:
  """SmolLM2 via `lminf fetch` (cached under ~/.cache/lminf_jax between test runs)."""
  from lminf_jax.util.fetch import fetch_smollm2

  return fetch_smollm2()


@pytest.fixture(scope="session")
def jargon_text() -> str:
  """The Jargon File beside the checkout; elsewhere (a checkout with no ../shared) Python's help
  topics, another long real text."""
  path = SHARED_DATA / "jargon.txt"
  if path.is_file():
    return path.read_text(encoding="utf-8")
  from lminf_jax.eval.texts import builtin_text

  return builtin_text()


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
  """Drops JAX's caches after each test file. Every compiled XLA:CPU program keeps memory
  mappings of its code, a process holds at most vm.max_map_count (65530 by default) of them, and
  the whole suite's programs would pass that (a segfault inside the next compilation)."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
