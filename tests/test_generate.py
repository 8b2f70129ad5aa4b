"""jit-compiled generation: greedy equals transformers, batching, sampling, stop strings, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

from lminf_jax.attention import Dense, Lambda, Streaming
from lminf_jax.inference.forward import forward
from lminf_jax.inference.generation import Sampling, generate
from lminf_jax.loading import convert_checkpoint, load

PROMPTS = [[5, 17, 33, 8, 64, 12, 9], [40, 2, 71, 19]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  hf = tiny_hf_model("llama_gqa")
  hf.save_pretrained(root / "hf")
  ckpt = convert_checkpoint(root / "hf", root / "ckpt")
  config, params, _ = load(ckpt)
  return hf, config, params, ckpt


def _hf_greedy(hf, prompt, n, eos=None):
  import torch

  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [3, 512])
def test_greedy_dense_equals_transformers_generate(tiny, chunk):
  hf, config, params, _ = tiny
  for prompt in PROMPTS:
    ours = generate(params, config, [prompt], 24, attention=Dense(), eos_ids=(), chunk=chunk)[0]
    assert ours == _hf_greedy(hf, prompt, 24)


def test_eos_stops_a_row(tiny):
  hf, config, params, _ = tiny
  free = generate(params, config, [PROMPTS[0]], 24, eos_ids=())[0]
  eos = free[5]
  stopped = generate(params, config, [PROMPTS[0]], 24, eos_ids=(eos,))[0]
  assert stopped == free[:free.index(eos) + 1]
  assert stopped == _hf_greedy(hf, PROMPTS[0], 24, eos=eos)


def test_generation_config_eos_stops_as_in_transformers(tiny, tmp_path, capsys):
  """An HF dir whose generation_config.json adds an EOS id to config.json's (as Gemma's
  <end_of_turn>): generation from its conversion stops where transformers' `generate` stops, and
  so does transformers' `generate` on our export of it."""
  import torch
  from transformers import AutoModelForCausalLM

  hf, config, params, _ = tiny
  prompt = PROMPTS[0]
  free = generate(params, config, [prompt], 24, eos_ids=())[0]
  end = next(t for t in free[3:] if t not in config.eos_token_ids)
  hf.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [*config.eos_token_ids, end]}))

  def hf_generate(model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32", attn_implementation="eager")
    with torch.no_grad():
      out = model.eval().generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()

  expected = hf_generate(tmp_path / "hf")
  assert expected == free[:free.index(end) + 1]  # (the file is what stops it)
  config2, params2, _ = load(convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt"))
  assert generate(params2, config2, [prompt], 24)[0] == expected
  assert run_cli(capsys, "export", tmp_path / "ckpt", tmp_path / "export")[0] == 0
  assert hf_generate(tmp_path / "export") == expected


@pytest.mark.parametrize("spec", [Dense(chunk=4), Lambda(n_global=2, n_local=9, chunk=4, key_block=4),
                                  Streaming(n_sink=2, n_recent=9, chunk=4, key_block=4),
                                  Lambda(n_global=2, n_local=128, chunk=4, key_block=4)])
def test_batched_left_padded_rows_equal_each_row_alone(tiny, spec):
  _, config, params, _ = tiny
  batched = generate(params, config, PROMPTS, 30, attention=spec, eos_ids=(), chunk=4)
  for prompt, row in zip(PROMPTS, batched):
    assert row == generate(params, config, [prompt], 30, attention=spec, eos_ids=(), chunk=4)[0]


@pytest.mark.parametrize("spec", [Lambda(n_global=2, n_local=9, chunk=4, key_block=4),
                                  Streaming(n_sink=2, n_recent=9, chunk=4, key_block=4),
                                  Lambda(n_global=2, n_local=128, chunk=4, key_block=4)])
def test_greedy_decode_picks_the_one_shot_argmax(tiny, spec):
  """40 decoded tokens, the ring wrapping several times (or, with a window longer than the
  stream, a ring of prompt + 40 slots): each is the argmax of the one-shot forward's logits over
  the prompt and the tokens before it."""
  _, config, params, _ = tiny
  prompt = PROMPTS[0]
  out = generate(params, config, [prompt], 40, attention=spec, eos_ids=(), chunk=4)[0]
  logits = forward(params, config, jnp.asarray([prompt + out]), attention=spec)
  np.testing.assert_array_equal(np.asarray(logits[0, len(prompt) - 1:-1]).argmax(-1), out)


def test_sampling_is_reproducible_and_seed_dependent(tiny):
  _, config, params, _ = tiny
  sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9)
  runs = [generate(params, config, PROMPTS, 20, sampling=sampling, key=jax.random.PRNGKey(seed), eos_ids=())
          for seed in (1, 1, 2)]
  assert runs[0] == runs[1]
  assert runs[0] != runs[2]


def test_top_k_one_is_greedy(tiny):
  _, config, params, _ = tiny
  greedy = generate(params, config, PROMPTS, 16, eos_ids=())
  assert generate(params, config, PROMPTS, 16, sampling=Sampling(temperature=0.7, top_k=1), eos_ids=()) == greedy
  assert generate(params, config, PROMPTS, 16, sampling=Sampling(temperature=0.7, top_p=1e-6), eos_ids=()) == greedy


def test_long_generation_past_the_window_keeps_the_cache_fixed(tiny):
  """max_new_tokens far beyond the lambda window: the loop runs in one jitted while_loop."""
  _, config, params, _ = tiny
  spec = Lambda(n_global=2, n_local=16, chunk=8, key_block=8)
  out = generate(params, config, [PROMPTS[1]], 300, attention=spec, eos_ids=())[0]
  assert len(out) == 300


def test_on_tokens_callback_streams_and_stops(tiny):
  _, config, params, _ = tiny
  seen = []

  def on_tokens(step, tokens):
    seen.append((int(step), np.asarray(tokens).tolist()))
    return np.asarray([int(step) >= 4, False])

  out = generate(params, config, PROMPTS, 10, eos_ids=(), on_tokens=on_tokens)
  assert [s for s, _ in seen] == list(range(10))
  assert len(out[0]) == 5 and len(out[1]) == 10
  assert [t[0] for _, t in seen[:5]] == out[0]


def test_generate_cli_bad_input(tiny, tmp_path, capsys):
  _, _, _, ckpt = tiny
  code, _, err = run_cli(capsys, "generate", ckpt, "--prompt-file", tmp_path / "missing.txt")
  assert code == 1 and "no such file" in err and err.count("\n") == 1
  code, _, err = run_cli(capsys, "generate", ckpt, "--prompt", "hi", "--chunk", "0")
  assert code == 2 and "--chunk" in err
  code, _, err = run_cli(capsys, "generate", ckpt, "--prompt", "", "--max-new-tokens", "3")
  assert code == 1 and "empty prompt" in err
