"""SmolLM2-135M-Instruct (the real GGUF from `lminf fetch`) against transformers on the same file."""

from __future__ import annotations

import tracemalloc

import jax
import numpy as np
import pytest
from helpers import run_cli


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  kwargs = dict(gguf_file=smollm2_gguf.name)
  tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
  model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs).eval()
  return model, tokenizer


def test_fetch_is_cached_and_nll_matches_transformers(smollm2_ckpt, transformers_smollm2, jargon_text, tmp_path,
                                                      capsys):
  import torch

  code, out, _ = run_cli(capsys, "fetch", "smollm2")
  assert code == 0 and out.strip() == str(smollm2_ckpt)  # already there: nothing more to do

  model, tokenizer = transformers_smollm2
  text_file = tmp_path / "slice.txt"
  text_file.write_text(jargon_text[200_000:204_000])
  ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"][:512]
  assert len(ids) == 512
  code, out, err = run_cli(capsys, "nll", smollm2_ckpt, "--text-file", text_file, "--max-tokens", 512,
                           "--out", tmp_path / "nll.npy")
  assert code == 0, err
  ours = np.load(tmp_path / "nll.npy")
  assert ours.dtype == np.float32 and ours.shape == (511,)

  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
  expected = (torch.logsumexp(logits, -1) - logits.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
  printed_mean = float(out.split("mean NLL ")[1].split()[0])
  assert abs(printed_mean - expected.mean()) < 1e-3


def test_greedy_generation_matches_transformers(smollm2_ckpt, transformers_smollm2):
  """The first 32 greedy tokens after a short prompt, lminf generate against transformers' generate."""
  import torch

  from lminf_jax.attention import Dense, Lambda
  from lminf_jax.inference.generation import generate
  from lminf_jax.loading import load

  model, tokenizer = transformers_smollm2
  ids = tokenizer("The Jargon File is a glossary of", add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
  config, params, _ = load(smollm2_ckpt)
  for attention in (Dense(), Lambda(n_global=10)):  # a 40-token text is inside lambda's window
    assert generate(params, config, [ids], 32, attention=attention) == [expected]


def test_gguf_conversion_peak_memory_under_twice_the_params(smollm2_gguf):
  """Tensor-by-tensor conversion: traced peak allocation < 2x the final params."""
  from lminf_jax.convert.gguf_file import load_gguf

  tracemalloc.start()
  try:
    _, params = load_gguf(smollm2_gguf)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert params_bytes > 500e6  # 135M float32 params
  assert peak < 2 * params_bytes, (peak, params_bytes)
