"""Configs that transformers reads in a way of its own: an MPT whose expansion_ratio its 4x tensors
contradict, Gemma's sliding window (its default, all-global layers, every layer windowed), checked
against transformers' logits and its reading of our export."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model, torch_logits

from lminf_jax.inference.forward import forward
from lminf_jax.loading import load

TOKENS = (np.arange(24) * 7 % 97).astype(np.int32)[None]


def _our_logits(path):
  config, params, _ = load(path)
  return config, np.asarray(forward(params, config, TOKENS))


def test_mpt_saved_with_expansion_ratio_2_loads_as_transformers_does(tmp_path, capsys):
  """transformers' MPT builds a 4 x d_model MLP whatever expansion_ratio says, so its saved dir says 2 and
  holds 4x tensors: the width comes from the tensors, with a one-line note (was: a shape refusal)."""
  model = tiny_hf_model("mpt", expansion_ratio=2)
  assert model.config.expansion_ratio == 2 and model.transformer.blocks[0].ffn.up_proj.out_features == 4 * 64
  model.save_pretrained(tmp_path / "hf")
  code, _, err = run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "ckpt")
  assert code == 0, err
  notes = [line for line in err.splitlines() if line.startswith("lminf:")]
  assert len(notes) == 1 and "implies an MLP of 128, its tensors hold 256" in notes[0], err
  config, logits = _our_logits(tmp_path / "ckpt")
  assert config.intermediate_size == 256
  np.testing.assert_allclose(logits, torch_logits(model, TOKENS), atol=1e-4)


def test_gemma3_with_only_global_layers_equals_transformers(tmp_path):
  """A sliding_window with no sliding layer: nothing is windowed, the local RoPE is unused (was: refused
  as 'local_rope_theta needs windowed layers')."""
  model = tiny_hf_model("gemma3_text", layer_types=["full_attention"] * 6, sliding_window=8)
  model.save_pretrained(tmp_path / "hf")
  config, logits = _our_logits(tmp_path / "hf")
  assert config.sliding_window is None and config.local_rope_theta is None
  np.testing.assert_allclose(logits, torch_logits(model, TOKENS), atol=1e-4)


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention"] * 3], ids=["default pattern", "every layer"])
def test_gemma2_window_as_transformers_reads_it_and_back(tmp_path, layer_types):
  """No sliding_window in config.json: transformers' default (4096); every layer windowed: exported with
  its layer_types, so transformers (and we) read the same layers back."""
  from transformers import AutoModelForCausalLM

  overrides = {"layer_types": layer_types, "sliding_window": 8} if layer_types else {}
  model = tiny_hf_model("gemma2", **overrides)
  model.save_pretrained(tmp_path / "hf")
  if not layer_types:  # remove the key, as a hand-written config.json would
    import json

    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "sliding_window"}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
  config, logits = _our_logits(tmp_path / "hf")
  assert config.sliding_window == model.config.sliding_window
  np.testing.assert_allclose(logits, torch_logits(model, TOKENS), atol=1e-4)
  from lminf_jax.convert.export import write_hf

  config, params, tokenizer = load(tmp_path / "hf")
  write_hf(tmp_path / "exported", config, params, tokenizer, None)
  reread = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager").float().eval()
  assert reread.config.layer_types == model.config.layer_types
  np.testing.assert_allclose(torch_logits(reread, TOKENS), torch_logits(model, TOKENS), atol=1e-5)
