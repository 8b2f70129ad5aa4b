"""Checkpoints by their hub id, ORG/NAME[@REVISION]: resolved through huggingface_hub's own cache (HF_HOME,
HF_HUB_OFFLINE), converted once into lminf's cache (also when two processes convert it at once), and one
line when the model can't be had. The hub is unreachable here, so each hub case lays out a hub cache as
huggingface_hub writes it and runs offline, in a fresh process (huggingface_hub reads HF_HUB_OFFLINE at import)."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_hf_model, torch_logits

from lminf_jax.util.hub import ALLOW_PATTERNS, HubId, hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENS = (np.arange(16) * 5 % 97).astype(np.int32)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """(env, model): HF_HOME holding lminf-test/tiny at COMMIT (branch main, tag v1), offline; an empty lminf cache."""
  root = tmp_path_factory.mktemp("hub")
  repo = root / "hf" / "hub" / "models--lminf-test--tiny"
  model = tiny_hf_model("llama_gqa")
  model.save_pretrained(repo / "snapshots" / COMMIT)
  (repo / "refs").mkdir()
  for ref in ("main", "v1"):
    (repo / "refs" / ref).write_text(COMMIT)
  env = dict(os.environ, HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", LMINF_CACHE=str(root / "cache"))
  np.save(root / "tokens.npy", TOKENS)
  return env, model, root


def _lminf(env, *args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "lminf_jax.cli", *map(str, args)], capture_output=True, text=True,
                        env=env, timeout=600)


def _expected_nll(model) -> np.ndarray:
  logits = torch_logits(model, TOKENS[None])[0]
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return -log_probs[np.arange(len(TOKENS) - 1), TOKENS[1:]]


def test_nll_by_hub_id_converts_once_and_matches_transformers(hub, tmp_path):
  env, model, root = hub
  for run in range(2):
    result = _lminf(env, "nll", "lminf-test/tiny", "--tokens-file", root / "tokens.npy", "--out", tmp_path / f"{run}.npy")
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / f"{run}.npy"), _expected_nll(model), atol=1e-4)
    converted = root / "cache" / "hub" / "lminf-test--tiny" / f"{COMMIT}-float32"
    if run == 0:
      stamp = (converted / "config.json").stat().st_mtime_ns
  assert (converted / "config.json").stat().st_mtime_ns == stamp  # the second run converted nothing
  assert [p.name for p in converted.parent.iterdir()] == [f"{COMMIT}-float32"]


@pytest.mark.parametrize("revision", ["@v1", f"@{COMMIT}"])
def test_convert_and_export_take_a_revision(hub, tmp_path, revision):
  env, model, _ = hub
  result = _lminf(env, "convert", f"lminf-test/tiny{revision}", tmp_path / "ckpt")
  assert result.returncode == 0, result.stderr[-3000:]
  result = _lminf(env, "export", f"lminf-test/tiny{revision}", tmp_path / "exported")
  assert result.returncode == 0, result.stderr[-3000:]
  from transformers import AutoModelForCausalLM

  exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
  np.testing.assert_allclose(torch_logits(exported, TOKENS[None]), torch_logits(model, TOKENS[None]), atol=1e-4)


@pytest.mark.parametrize("name, message", [
    ("lminf-test/absent", "lminf-test/absent: no such path, and not in the local hub cache"),
    ("lminf-test/tiny@v2", "lminf-test/tiny@v2: no such path, and not in the local hub cache"),
])
def test_a_model_that_cannot_be_had_offline_is_one_line(hub, tmp_path, name, message):
  env, _, root = hub
  result = _lminf(env, "nll", name, "--tokens-file", root / "tokens.npy", "--out", tmp_path / "x.npy")
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"lminf: error: {message} (offline, or the "
                                                                           f"hub is unreachable)"], result.stderr
  assert not list(tmp_path.iterdir())


def test_a_path_wins_over_a_hub_id(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub_id("org/name@rev") == HubId("org/name", "rev") and hub_id("org/name") == HubId("org/name", None)
  (tmp_path / "org" / "name").mkdir(parents=True)
  assert hub_id("org/name") is None
  assert hub_id("model.gguf") is None and hub_id("/abs/path/x") is None and hub_id("a/b/c") is None


def test_only_what_conversion_reads_is_downloaded():
  files = {"model-00001-of-00002.safetensors": True, "model-00002-of-00002.safetensors": True,
           "model.safetensors.index.json": True, "config.json": True, "generation_config.json": True,
           "tokenizer.json": True, "tokenizer_config.json": True, "special_tokens_map.json": True,
           "tokenizer.model": True, "pytorch_model.bin": False, "original/consolidated.00.pth": False,
           "model.gguf": False, "README.md": False, "onnx/model.onnx": False, "flax_model.msgpack": False}
  allowed = {name: any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS) for name in files}
  assert allowed == files


def test_a_conversion_another_process_committed_first_is_the_one_used(tmp_path, monkeypatch):
  """Two processes filling one cache entry at once (two shells, parallel tests): the one that commits
  second returns the first's checkpoint, not an error; an output that is not a checkpoint still is one."""
  from lminf_jax import loading
  from lminf_jax.convert.checkpoint import is_checkpoint
  from lminf_jax.errors import UserError
  from lminf_jax.util.fetch import cached_conversion

  src, out = tmp_path / "hf", tmp_path / "cache" / "tiny"
  model = tiny_hf_model("llama_gqa")
  model.save_pretrained(src)
  real = loading.convert_source

  def racing(path, dtype=None, **kwargs):  # converts, then lets the other process commit first
    converted = real(path, dtype, **kwargs)
    monkeypatch.setattr(loading, "convert_source", real)
    loading.convert_checkpoint(path, out)
    return converted

  monkeypatch.setattr(loading, "convert_source", racing)
  assert cached_conversion(lambda: src, out) == out and is_checkpoint(out)
  config, params, _ = loading.load(out)
  np.testing.assert_allclose(_forward_logits(params, config), torch_logits(model, TOKENS[None])[0], atol=1e-4)
  (tmp_path / "not_a_checkpoint").mkdir()
  with pytest.raises(UserError, match="already exists"):
    cached_conversion(lambda: src, tmp_path / "not_a_checkpoint")


def _forward_logits(params, config) -> np.ndarray:
  from lminf_jax.inference.forward import forward

  return np.asarray(forward(params, config, TOKENS[None]))[0]
