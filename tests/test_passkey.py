"""Passkey prompts (LM-Infinite's format) and the `lminf passkey` command on SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from lminf_jax.eval.passkey import FILLER, NEEDLE, PREFIX, QUESTION, PasskeyTask, depth_bucket, first_integer, make_sample
from lminf_jax.eval.task import plot, score_grid


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(smollm2_ckpt))


@pytest.mark.parametrize("length", [256, 1000, 3000])
def test_sample_has_the_format_length_and_depth(tokenizer, length):
  rng = np.random.default_rng(length)
  for _ in range(3):
    sample = make_sample(tokenizer, length, rng)
    assert length - 40 <= len(sample.token_ids) <= length
    text = tokenizer.decode(sample.token_ids)
    needle = NEEDLE.format(key=sample.key)
    assert text.startswith(PREFIX) and text.endswith(QUESTION) and text.count(needle) == 1
    before, after = text.split(needle)
    fillers_before, fillers_after = before.count(FILLER), after.count(FILLER)
    assert abs(fillers_before / (fillers_before + fillers_after) - sample.depth) <= 1.0 / (fillers_before +
                                                                                          fillers_after)


def test_answer_parsing_and_buckets():
  assert first_integer(" 48213. Remember") == 48213
  assert first_integer("no digits") is None
  assert [depth_bucket(d, 5) for d in (0.0, 0.19, 0.2, 0.99, 1.0)] == [0, 0, 1, 4, 4]


def test_passkey_cli_runs_and_reports(smollm2_ckpt, tmp_path, capsys):
  code, out, err = run_cli(capsys, "passkey", smollm2_ckpt, "--lengths", "200,400", "--samples", "2",
                           "--attention", "lambda", "--n-local", "256", "--batch", "2", "--json", tmp_path / "p.json",
                           "--plot", tmp_path / "p.png")
  assert code == 0, err
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  results = json.loads((tmp_path / "p.json").read_text())["results"]
  assert [(r["method"], r["length"]) for r in results] == [("lambda", 200)] * 2 + [("lambda", 400)] * 2
  assert all(r["correct"] == (r["answer"] == r["key"]) and r["prompt_tokens"] <= r["length"] for r in results)
  assert "lambda" in out and "accuracy" in out
  code, _, err = run_cli(capsys, "passkey", smollm2_ckpt, "--lengths", "2k")
  assert code == 2 and "not an integer" in err


def _png_size(path) -> tuple[int, int]:
  header = path.read_bytes()[:24]
  assert header[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_heatmap_accuracy_per_length_and_depth(tmp_path):
  """The heatmap's cells are the accuracy of the samples in each (depth bucket, length), counted by
  hand here; a cell without samples is empty; one panel per method."""
  results = [dict(method="lambda", length=1000, depth=0.1, correct=True),
             dict(method="lambda", length=1000, depth=0.15, correct=False),
             dict(method="lambda", length=1000, depth=0.9, correct=True),
             dict(method="lambda", length=2000, depth=0.5, correct=False),
             dict(method="dense", length=1000, depth=0.1, correct=False)]
  task = PasskeyTask(lengths=(1000, 2000), depth_buckets=2)
  grid = score_grid(task, results, "lambda")
  np.testing.assert_array_equal(grid, [[0.5, np.nan], [1.0, 0.0]])
  np.testing.assert_array_equal(score_grid(task, results, "dense"), [[0.0, np.nan], [np.nan, np.nan]])
  plot(tmp_path / "one.png", task, results, ["lambda"], "t")
  plot(tmp_path / "two.png", task, results, ["lambda", "dense"], "t")
  assert _png_size(tmp_path / "two.png")[0] > _png_size(tmp_path / "one.png")[0]
