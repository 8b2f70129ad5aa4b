"""Passkey retrieval in LM-Infinite's format (docs/evaluation.md#passkey-retrieval): a 5-digit key hidden at a
uniformly random depth in repeated filler, greedy decoding, correct if the first integer
generated is the key."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from lminf_jax.errors import UserError

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is "


@dataclasses.dataclass
class PasskeySample:
  length: int  # target length in tokens
  depth: float  # needle position as a fraction of the filler
  key: int
  token_ids: list[int]


def make_sample(tokenizer, length: int, rng: np.random.Generator) -> PasskeySample:
  """A prompt of about `length` tokens (never more) with the needle at a random depth. Raises
  UserError if `length` is shorter than the prompt without filler."""
  key = int(rng.integers(10000, 100000))
  count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
  fixed = count(" ".join([PREFIX, NEEDLE.format(key=key)]) + QUESTION)  # the prompt without filler
  if fixed > length:
    raise UserError(f"passkey length {length} is too short: the prompt without filler takes {fixed} tokens")
  per_filler = count(" ".join([FILLER] * 10)) / 10
  fillers = max(0, int((length - fixed) / per_filler))
  while True:
    depth = float(rng.uniform())
    at = round(depth * fillers)
    text = " ".join([PREFIX] + [FILLER] * at + [NEEDLE.format(key=key)] + [FILLER] * (fillers - at)) + QUESTION
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= length or fillers == 0:
      return PasskeySample(length, depth, key, ids)
    fillers -= 1


def first_integer(text: str) -> int | None:
  match = re.search(r"\d+", text)
  return int(match.group()) if match else None


def depth_bucket(depth: float, buckets: int) -> int:
  return min(int(depth * buckets), buckets - 1)


def accuracy_grid(results: list[dict], method: str, lengths: list[int], buckets: int) -> np.ndarray:
  """Accuracy [depth bucket, length] of one method's results (dicts with method, length, depth,
  correct); NaN where no sample fell."""
  hits, total = np.zeros((buckets, len(lengths))), np.zeros((buckets, len(lengths)))
  for r in results:
    if r["method"] == method and r["length"] in lengths:
      at = depth_bucket(r["depth"], buckets), lengths.index(r["length"])
      hits[at] += bool(r["correct"])
      total[at] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, hits / total, np.nan)


def plot_heatmap(path, results: list[dict], methods: list[str], lengths: list[int], buckets: int, title: str) -> None:
  """The needle heatmap: context length (x) by needle depth (y), colour = accuracy, one panel per method."""
  from lminf_jax.eval.plots import heatmap

  heatmap(path, {m: accuracy_grid(results, m, lengths, buckets) for m in methods}, [str(n) for n in lengths],
          [f"{b * 100 // buckets}-{(b + 1) * 100 // buckets}%" for b in range(buckets)], "context length (tokens)",
          "needle depth", title)
