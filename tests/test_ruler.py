"""RULER's tasks (lminf_jax.eval.ruler): exact lengths, needles where they are said to be, RULER's
scoring on hand-written predictions, and `lminf ruler` end to end on SmolLM2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import run_cli

from lminf_jax.errors import UserError
from lminf_jax.eval.ruler import TASKS, Words, _Builder, make_sample, string_match_all
from lminf_jax.eval.texts import builtin_text


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(smollm2_ckpt))


@pytest.fixture(scope="module")
def make(tokenizer):
  words, builder, essay = Words(), _Builder(tokenizer), builtin_text()
  return lambda task, length, seed=0: make_sample(tokenizer, task, length, np.random.default_rng(seed), essay, words,
                                                  builder)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [777, 2048])
def test_prompt_has_the_requested_length_and_its_answers(make, tokenizer, task, length):
  sample = make(task, length, seed=length)
  assert len(sample.token_ids) == length
  text = tokenizer.decode(sample.token_ids)
  for answer in sample.answers:
    assert answer in text
  expected = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10, "fwe": 3}.get(task, 1)
  assert len(sample.answers) == expected


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")] + ["vt"])
def test_needles_sit_at_their_stated_positions_and_depths(make, tokenizer, task):
  sample = make(task, 3000, seed=1)
  needle = "VAR" if task == "vt" else "One of the special magic"
  found = [m.start() for m in re.finditer(re.escape(needle), tokenizer.decode(sample.token_ids))]
  assert len(sample.needle_at) >= 1
  for at in sample.needle_at:
    assert tokenizer.decode(sample.token_ids[at:at + 12]).lstrip().startswith(needle)
  # A stated depth is its needle's token offset in the haystack over the haystack's length: in
  # the needles' order, and the same haystack length from every pair of needles.
  order = np.argsort(sample.needle_at)
  at, depth = np.asarray(sample.needle_at)[order], np.asarray(sample.depths)[order]
  assert np.all(np.diff(depth) > 0) and 0 <= depth[0] and depth[-1] < 1
  hay_lengths = np.diff(at) / np.diff(depth)
  assert np.all((hay_lengths > 0) & (hay_lengths < len(sample.token_ids)))
  np.testing.assert_allclose(hay_lengths, hay_lengths[:1].repeat(len(hay_lengths)), rtol=1e-9)
  if task != "vt" and TASKS[task].haystack == "needle":  # distractor needles fill the haystack
    assert len(found) > 20
  elif task != "vt":
    assert len(found) == len(sample.needle_at)


def test_the_query_asks_for_the_answers(make, tokenizer):
  sample = make("niah_multiquery", 2000, seed=3)
  text = tokenizer.decode(sample.token_ids)
  question = text[text.index("What are all the special magic numbers for "):]
  for answer in sample.answers:  # each queried key's needle carries its answer
    key = re.search(rf"for ([\w-]+) is: {answer}\.", text).group(1)
    assert key in question
  single = tokenizer.decode(make("niah_single_2", 2000).token_ids)
  assert single.startswith("A special magic number is hidden") and single.endswith(
      "mentioned in the provided text is")


def test_samples_follow_the_seed(make):
  a, b, c = make("niah_multikey_1", 1500, 7), make("niah_multikey_1", 1500, 7), make("niah_multikey_1", 1500, 8)
  assert a.token_ids == b.token_ids and a.answers == b.answers
  assert a.token_ids != c.token_ids


def test_frequent_and_common_words_are_the_answers(make, tokenizer):
  """The answers are the most frequent words of the list or coded text (counted here from the prompt)."""
  fwe = make("fwe", 4000, seed=2)
  body = tokenizer.decode(fwe.token_ids).split("coded words.")[1].split("\nQuestion")[0]
  counts = {w: body.split().count(w) for w in set(body.split()) if w != "..."}
  assert sorted(counts, key=counts.get, reverse=True)[:3] == fwe.answers
  cwe = make("cwe", 4000, seed=2)
  text = tokenizer.decode(cwe.token_ids)  # the real list: after the one-shot example
  listed = text.split("appear most often.\n")[-1].split("\nQuestion")[0]
  words = re.findall(r"\d+\. ([\w-]+)", listed)
  counts = {w: words.count(w) for w in set(words)}
  assert set(sorted(counts, key=counts.get, reverse=True)[:10]) == set(cwe.answers)


def test_too_short_a_length_is_refused(make):
  with pytest.raises(UserError, match="too short for niah_multivalue"):
    make("niah_multivalue", 60)


def test_string_match_all_on_hand_written_predictions():
  assert string_match_all(" The special magic number is: 1234567.", ["1234567"]) == 1.0
  assert string_match_all("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
  assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
  assert string_match_all("no number here", ["1234567"]) == 0.0
  assert string_match_all("12345\x0067", ["1234567"]) == 0.0  # control characters become newlines


def test_cli_writes_json_and_plot(smollm2_ckpt, tmp_path, capsys):
  code, out, err = run_cli(capsys, "ruler", smollm2_ckpt, "--lengths", "600", "--tasks", "niah_single_1,vt",
                           "--samples", "1", "--attention", "lambda", "--n-local", "512", "--json",
                           tmp_path / "r.json", "--plot", tmp_path / "r.png")
  assert code == 0, err
  report = json.loads((tmp_path / "r.json").read_text())
  assert [(r["task"], r["length"], r["prompt_tokens"]) for r in report["results"]] == [("niah_single_1", 600, 600),
                                                                                       ("vt", 600, 600)]
  for r in report["results"]:
    assert r["score"] == string_match_all(r["prediction"], r["answers"]) and r["depths"] and r["needle_at"]
  assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "niah_single_1" in out and "mean" in out


@pytest.mark.parametrize("args, message", [
    (("--tasks", "niah_single_9"), "unknown RULER task niah_single_9"),
    (("--tasks", "niah_multivalue", "--lengths", "50"), "too short for niah_multivalue"),
    (("--tasks", "niah_single_2", "--lengths", "300", "--haystack-file", "{empty}"),
     "the haystack text is empty, and niah_single_2 fills its haystack with it"),
    (("--tasks", "vt,niah_multikey_1", "--lengths", "300", "--haystack-file", "{blank}"),
     "the haystack text is empty, and niah_multikey_1 fills its haystack with it"),
])
def test_cli_bad_input_is_one_line(smollm2_ckpt, tmp_path, capsys, args, message):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text(" \n\t\n")
  args = [a.format(empty=tmp_path / "empty.txt", blank=tmp_path / "blank.txt") for a in args]
  code, _, err = run_cli(capsys, "ruler", smollm2_ckpt, "--samples", "1", "--json", tmp_path / "r.json", *args)
  assert code == 1 and err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "r.json").exists()
