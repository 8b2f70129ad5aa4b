"""MPT (ALiBi) models: transformers parity through caches and generation, MPT's slopes, and
refusals. (One-shot logits and the export round trip: the "mpt" kinds of test_parity.py and
test_export.py; every method's cached paths: test_families.py; each method's ALiBi attention
against the naive reference: test_alibi.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_cached_and_greedy_match_transformers, run_cli

from lminf_jax.errors import UserError
from lminf_jax.loading import load
from lminf_jax.models.config import LlamaConfig
from lminf_jax.positional import alibi_slopes

TOKENS = np.random.default_rng(1).integers(0, 97, size=(2, 40))


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
  """(transformers model, config, params) of a tiny random MPT."""
  from helpers import tiny_hf_model

  model = tiny_hf_model("mpt")
  out = tmp_path_factory.mktemp("mpt") / "hf"
  model.save_pretrained(out)
  config, params, _ = load(out)
  return model, config, params


def test_cached_prefill_and_greedy_generation_match_transformers(mpt):
  model, config, params = mpt
  assert config.alibi_bias_max == 8 and config.layer_norm and not config.gated_mlp
  assert_cached_and_greedy_match_transformers(model, params, config, TOKENS)


@pytest.mark.parametrize("heads, bias_max", [(3, 8), (4, 8), (6, 8), (12, 4), (32, 8)])
def test_alibi_slopes_are_transformers(heads, bias_max):
  from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

  bias = build_mpt_alibi_tensor(heads, 4, bias_max).numpy()  # [N, 1, 4]: slope * (j - 3)
  np.testing.assert_allclose(alibi_slopes(heads, bias_max), -bias[:, 0, 2], rtol=1e-6)


MPT = dict(model_type="mpt", vocab_size=97, d_model=64, n_heads=4, n_layers=2, max_seq_len=256)


@pytest.mark.parametrize("change, message", [
    (dict(attn_config=dict(prefix_lm=True)), "prefix_lm"),
    (dict(attn_config=dict(qk_ln=True)), "qk_ln"),
    (dict(attn_config=dict(clip_qkv=6.0)), "clip_qkv"),
    (dict(attn_config=dict(softmax_scale=0.1)), "softmax_scale"),
    (dict(attn_config=dict(alibi=False)), "alibi"),
    (dict(attn_config=dict(attn_type="multiquery_attention")), "attn_type"),
    (dict(no_bias=False), "no_bias"),
    (dict(logit_scale=0.5), "logit_scale"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(d_model=66), "multiple of n_heads"),
])
def test_unsupported_mpt_variants_are_refused(change, message):
  with pytest.raises(UserError, match=message):
    LlamaConfig.from_hf({**MPT, **change})


def test_cli_refuses_a_prefix_lm_in_one_line(save_tiny, tmp_path, capsys):
  import json

  _, hf_dir = save_tiny("mpt")
  config = json.loads((hf_dir / "config.json").read_text())
  config["attn_config"]["prefix_lm"] = True
  (hf_dir / "config.json").write_text(json.dumps(config))
  capsys.readouterr()  # (save_pretrained's progress bar)
  code, out, err = run_cli(capsys, "convert", hf_dir, tmp_path / "ckpt")
  assert code != 0 and err.startswith("lminf: error: ") and "prefix_lm" in err and err.count("\n") == 1
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("metadata, message", [
    (dict(clamp_kqv=6.0), "clip_qkv"),
    (dict(max_alibi_bias=0.0), "alibi"),
    (dict(head_count_kv=2), "attn_type"),
])
def test_unsupported_mpt_ggufs_are_refused_in_one_line(metadata, message, tmp_path, capsys):
  from helpers import _write_mpt_gguf, tiny_hf_model

  _write_mpt_gguf(tiny_hf_model("mpt"), tmp_path / "mpt.gguf", **metadata)
  code, _, err = run_cli(capsys, "convert", tmp_path / "mpt.gguf", tmp_path / "ckpt")
  assert code != 0 and err.startswith("lminf: error: ") and message in err and err.count("\n") == 1, err
  assert not (tmp_path / "ckpt").exists()
