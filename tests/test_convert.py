"""Checkpoint formats, Orbax round trip, determinism and atomic writes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

from lminf_jax.convert.checkpoint import load_checkpoint, save_checkpoint
from lminf_jax.convert.hf import load_hf


def _assert_trees_identical(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def hf_dir(tmp_path):
  model = tiny_hf_model("qwen2_bias")
  out = tmp_path / "hf"
  model.save_pretrained(out)
  return model, out


def test_sharded_safetensors_and_torch_bin_give_the_same_params(hf_dir, tmp_path):
  import torch

  model, single = hf_dir
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("*.safetensors"))) > 2
  binary = tmp_path / "bin"
  binary.mkdir()
  model.config.save_pretrained(binary)
  torch.save(model.state_dict(), binary / "pytorch_model.bin")
  _, reference = load_hf(single)
  _assert_trees_identical(load_hf(sharded)[1], reference)
  _assert_trees_identical(load_hf(binary)[1], reference)


def test_orbax_round_trip_is_bit_exact_and_conversion_deterministic(hf_dir, tmp_path, capsys):
  _, src = hf_dir
  config, params = load_hf(src)
  save_checkpoint(tmp_path / "a", config, params)
  restored_config, restored = load_checkpoint(tmp_path / "a")
  assert restored_config == config
  _assert_trees_identical(restored, params)
  assert run_cli(capsys, "convert", src, tmp_path / "b")[0] == 0
  assert run_cli(capsys, "convert", src, tmp_path / "c")[0] == 0
  _assert_trees_identical(load_checkpoint(tmp_path / "b")[1], load_checkpoint(tmp_path / "c")[1])


def test_load_with_dtype_and_sharding(hf_dir, tmp_path):
  _, src = hf_dir
  config, params = load_hf(src)
  save_checkpoint(tmp_path / "ckpt", config, params)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  config16, params16 = load_checkpoint(tmp_path / "ckpt", dtype="bfloat16", sharding=sharding)
  assert config16.param_dtype == "bfloat16"
  for leaf, original in zip(jax.tree.leaves(params16), jax.tree.leaves(params)):
    assert leaf.dtype == jax.numpy.bfloat16 and leaf.sharding == sharding
    np.testing.assert_array_equal(np.asarray(leaf), original.astype(jax.numpy.bfloat16))


def test_failed_conversion_leaves_nothing_behind(hf_dir, tmp_path, monkeypatch, capsys):
  """An error after the params were written (here: while saving the tokenizer) leaves no dir."""
  import lminf_jax.convert.checkpoint as checkpoint

  _, src = hf_dir
  config, params = load_hf(src)

  class BrokenTokenizer:
    def save_pretrained(self, path):
      raise OSError("disk full")

  with pytest.raises(OSError):
    checkpoint.save_checkpoint(tmp_path / "out" / "ckpt", config, params, BrokenTokenizer())
  assert list((tmp_path / "out").iterdir()) == []
  # A checkpoint dir without config.json (as an interrupted write would look) is not loadable.
  (tmp_path / "half" / "params").mkdir(parents=True)
  code, _, err = run_cli(capsys, "nll", tmp_path / "half", "--tokens-file", tmp_path / "x.npy", "--out",
                         tmp_path / "n.npy")
  assert code == 1 and "not a model dir" in err
