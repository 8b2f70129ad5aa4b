"""Model-level long-context behaviour: lambda/streaming through the whole model and the CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

from lminf_jax.attention import Dense, Lambda, Streaming
from lminf_jax.inference.forward import forward
from lminf_jax.loading import load


def _letter_tokenizer():
  """A tokenizer with one token per capital letter (ids 0..25), for text-file commands."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({chr(65 + i): i for i in range(26)}, unk_token="A"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A tiny random Llama (GQA) converted to a checkpoint dir, plus a 1-D tokens file."""
  root = tmp_path_factory.mktemp("long")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")
  from lminf_jax.loading import convert_checkpoint

  convert_checkpoint(root / "hf", root / "ckpt")
  _letter_tokenizer().save_pretrained(root / "ckpt")
  np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 97, size=150))
  return root


def test_nll_lambda_with_window_past_the_text_equals_dense(tiny_ckpt, capsys):
  common = ("nll", tiny_ckpt / "ckpt", "--tokens-file", tiny_ckpt / "tokens.npy", "--chunk", "32")
  assert run_cli(capsys, *common, "--out", tiny_ckpt / "dense.npy", "--attention", "dense")[0] == 0
  assert run_cli(capsys, *common, "--out", tiny_ckpt / "lambda.npy", "--attention", "lambda", "--n-local", "200",
                 "--n-global", "4")[0] == 0
  assert run_cli(capsys, *common, "--out", tiny_ckpt / "short.npy", "--attention", "lambda", "--n-local", "20",
                 "--n-global", "4")[0] == 0
  dense = np.load(tiny_ckpt / "dense.npy")
  np.testing.assert_allclose(np.load(tiny_ckpt / "lambda.npy"), dense, atol=1e-5)
  short = np.load(tiny_ckpt / "short.npy")
  np.testing.assert_allclose(short[:20], dense[:20], atol=1e-5)  # identical inside the window ...
  assert np.abs(short[20:] - dense[20:]).max() > 1e-3  # ... and a different model past it


@pytest.mark.parametrize("spec", [Lambda(n_global=4, n_local=24, chunk=16), Streaming(n_sink=4, n_recent=24, chunk=16)])
def test_model_is_invariant_to_a_1e8_position_offset(tiny_ckpt, spec):
  config, params, _ = load(tiny_ckpt / "ckpt")
  tokens = jnp.asarray(np.load(tiny_ckpt / "tokens.npy"))[None]
  positions = jnp.arange(tokens.shape[1])[None]
  at_zero = np.asarray(forward(params, config, tokens, positions, attention=spec))
  at_1e8 = np.asarray(forward(params, config, tokens, positions + 10**8, attention=spec))
  np.testing.assert_allclose(at_1e8, at_zero, atol=1e-4)


def test_ppl_cli_writes_table_json_and_plot(tiny_ckpt, tmp_path, capsys):
  from lminf_jax.inference.forward import token_nll

  text = tmp_path / "text.txt"
  text.write_text("".join(chr(65 + i % 26) for i in range(400)))
  code, out, err = run_cli(capsys, "ppl", tiny_ckpt / "ckpt", "--text-file", text, "--lengths", "64,96",
                           "--attention", "lambda,dense", "--n-local", "32", "--n-global", "2", "--bucket", "16",
                           "--offset", "3", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
  assert code == 0, err
  report = json.loads((tmp_path / "r.json").read_text())
  assert [(r["method"], r["length"]) for r in report["results"]] == [("lambda", 64), ("lambda", 96), ("dense", 64),
                                                                     ("dense", 96)]
  config, params, _ = load(tiny_ckpt / "ckpt")
  ids = jnp.asarray([[(3 + i) % 26 for i in range(96)]])
  dense = np.asarray(token_nll(params, config, ids, attention=Dense()))[0]
  dense_96 = report["results"][3]
  assert len(dense_96["bucket_nll"]) == 6
  np.testing.assert_allclose(dense_96["bucket_nll"], [dense[i:i + 16].mean() for i in range(0, 95, 16)], atol=1e-5)
  assert "lambda" in out and "dense" in out and (tmp_path / "r.png").stat().st_size > 1000


def test_ppl_rejects_text_shorter_than_the_longest_length(tiny_ckpt, tmp_path, capsys):
  text = tmp_path / "short.txt"
  text.write_text("ABC" * 10)
  code, _, err = run_cli(capsys, "ppl", tiny_ckpt / "ckpt", "--text-file", text, "--lengths", "64")
  assert code == 1 and err.count("\n") == 1 and "needs 64" in err
  code, _, err = run_cli(capsys, "ppl", tiny_ckpt / "ckpt", "--text-file", text, "--lengths", "64,x")
  assert code == 2 and "not an integer" in err
