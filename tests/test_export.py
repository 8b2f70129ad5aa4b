"""`lminf export`: checkpoint -> Hugging Face dir that transformers loads to the same logits, and
that `lminf convert` reads back to the same params bit for bit (float32)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_KINDS, run_cli, torch_logits

from lminf_jax.inference.forward import forward
from lminf_jax.loading import load
from lminf_jax.train.loop import FINAL

TOKENS = np.random.default_rng(1).integers(0, 97, size=(2, 24))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _hf_model(path):
  from transformers import AutoModelForCausalLM

  return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", attn_implementation="eager").eval()


def _assert_params_equal(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_export_round_trip(kind, save_tiny, tmp_path, capsys):
  """HF -> convert -> export: transformers reads the export to its original logits and config,
  and converting the export again gives the checkpoint's params bit for bit."""
  model, hf_dir = save_tiny(kind)
  assert run_cli(capsys, "convert", hf_dir, tmp_path / "ckpt")[0] == 0
  code, out, err = run_cli(capsys, "export", tmp_path / "ckpt", tmp_path / "export")
  assert code == 0, err
  assert "wrote" in out
  assert {f.stat().st_mode & 0o777 for f in (tmp_path / "export").iterdir()} == {0o666 & ~_umask()}
  exported = _hf_model(tmp_path / "export")
  np.testing.assert_allclose(torch_logits(exported, TOKENS), torch_logits(model, TOKENS), atol=1e-5, rtol=0)
  assert run_cli(capsys, "convert", tmp_path / "export", tmp_path / "again")[0] == 0
  config, params, _ = load(tmp_path / "ckpt")
  config2, params2, _ = load(tmp_path / "again")
  assert config2 == config
  _assert_params_equal(params, params2)


def test_export_bfloat16_and_shards(tiny_model, tmp_path):
  """--dtype bfloat16 stores bf16 tensors (transformers' logits within bf16 rounding of ours), and
  a small shard limit gives save_pretrained's sharded layout, which transformers reads too."""
  import torch

  from lminf_jax.convert.export import write_hf

  config, params, ckpt = tiny_model
  write_hf(tmp_path / "bf16", config, params, dtype="bfloat16", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 1 and all((tmp_path / "bf16" / f).is_file() for f in files)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  exported = _hf_model(tmp_path / "bf16")
  assert all(p.dtype == torch.float32 for p in exported.parameters())  # (loaded as asked)
  bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  ours = forward(bf16_params, config.replace(param_dtype="bfloat16"), jnp.asarray(TOKENS))
  np.testing.assert_allclose(torch_logits(exported, TOKENS), np.asarray(ours), atol=1e-4, rtol=0)


def test_export_of_a_finetuned_checkpoint(tiny_model, tmp_path, capsys):
  """A `lminf finetune` output exports to a dir whose transformers logits equal our forward of
  the fine-tuned params (which differ from the base model's)."""
  config, base, ckpt = tiny_model
  tokens = np.random.default_rng(2).integers(0, config.vocab_size, 400).astype(np.int32)
  np.save(tmp_path / "tokens.npy", tokens)
  code, _, err = run_cli(capsys, "finetune", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--seq-len", 32,
                         "--steps", 2, "--lr", 1e-2, "--batch", 2, "--out", tmp_path / "run")
  assert code == 0, err
  final = tmp_path / "run" / FINAL
  assert run_cli(capsys, "export", final, tmp_path / "export")[0] == 0
  _, tuned, _ = load(final)
  ours = np.asarray(forward(tuned, config, jnp.asarray(TOKENS)))
  assert np.abs(ours - np.asarray(forward(base, config, jnp.asarray(TOKENS)))).max() > 1e-3
  np.testing.assert_allclose(torch_logits(_hf_model(tmp_path / "export"), TOKENS), ours, atol=1e-4, rtol=0)


def test_export_of_smollm2_keeps_the_tokenizer(smollm2_ckpt, tmp_path, capsys):
  """The real model's export carries its tokenizer (same ids, same chat template) and config."""
  from transformers import AutoConfig, AutoTokenizer

  assert run_cli(capsys, "export", smollm2_ckpt, tmp_path / "export", "--dtype", "bfloat16")[0] == 0
  _, _, ours = load(smollm2_ckpt)
  theirs = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  text = "The Jargon File: hacker slang, 1975-2003."
  assert theirs(text)["input_ids"] == ours(text)["input_ids"]
  assert theirs.chat_template == ours.chat_template
  hf = AutoConfig.from_pretrained(str(tmp_path / "export"))
  assert (hf.model_type, hf.num_hidden_layers, hf.num_key_value_heads) == ("llama", 30, 3)


@pytest.mark.parametrize("change, message", [
    (dict(sliding_window=16), "llama has no sliding window"),
    (dict(qkv_bias=True), "no form for q/k/v bias=True with o bias=False"),
])
def test_export_refuses_what_transformers_cannot_express(change, message, tiny_model, tmp_path):
  from lminf_jax.convert.export import write_hf
  from lminf_jax.errors import UserError

  config, params, _ = tiny_model
  with pytest.raises(UserError, match=message):
    write_hf(tmp_path / "out", config.replace(**change), params)
  assert not (tmp_path / "out").exists()


def test_export_to_an_existing_dir_is_refused_before_loading(tiny_model, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  code, _, err = run_cli(capsys, "export", tiny_model[2], tmp_path / "out")
  assert code != 0 and err.startswith("lminf: error:") and "already exists" in err
