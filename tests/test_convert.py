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


def test_safetensors_reader_equals_the_safetensors_library(tmp_path):
  """The reader (plain reads, no memory map) gives the arrays of safetensors' own writer, dtype for dtype."""
  import ml_dtypes
  import torch
  from safetensors.torch import save_file

  from lminf_jax.convert.safetensors_file import iter_tensors

  tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2, 2).half(),
             "i64": torch.arange(6).reshape(2, 3), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
  save_file(tensors, tmp_path / "x.safetensors")
  got = dict(iter_tensors(tmp_path / "x.safetensors"))
  assert got.keys() == tensors.keys()
  for name, t in tensors.items():
    expected = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
    np.testing.assert_array_equal(got[name], expected)


def test_a_bfloat16_model_dir_loads_and_converts_as_bfloat16(tmp_path, capsys):
  """A bfloat16 HF dir keeps its dtype by default (as transformers 5 loads it): its params are its
  tensors, and the logits (computed in float32) equal those of the same weights in float32, which
  equal transformers' float32 model of them."""
  import torch
  from helpers import torch_logits

  from lminf_jax.inference.forward import forward
  from lminf_jax.loading import load

  model = tiny_hf_model("llama_headdim_untied").to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf")
  config, params, _ = load(tmp_path / "hf")
  config32, params32, _ = load(tmp_path / "hf", dtype="float32")
  assert config.param_dtype == "bfloat16" and config32.param_dtype == "float32"
  assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(params))
  embed = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embed_vd"], np.float32), embed)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 24))
  logits = np.asarray(forward(params, config, jax.numpy.asarray(tokens)))
  np.testing.assert_allclose(logits, np.asarray(forward(params32, config32, jax.numpy.asarray(tokens))),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits, torch_logits(model.float(), tokens), rtol=1e-4, atol=1e-4)
  assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "ckpt")[0] == 0
  assert load_checkpoint(tmp_path / "ckpt")[0].param_dtype == "bfloat16"


def test_a_checkpoint_written_compressed_restores(hf_dir, tmp_path):
  """Checkpoints written before the writer dropped compression (Orbax's StandardCheckpointer) still
  restore, leaf by leaf, bit for bit."""
  import shutil

  import orbax.checkpoint as ocp

  _, src = hf_dir
  config, params = load_hf(src)
  save_checkpoint(tmp_path / "new", config, params)
  (tmp_path / "old").mkdir()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "old" / "params", params)
    checkpointer.wait_until_finished()
  shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
  _assert_trees_identical(load_checkpoint(tmp_path / "old")[1], params)
  _assert_trees_identical(load_checkpoint(tmp_path / "new")[1], params)
