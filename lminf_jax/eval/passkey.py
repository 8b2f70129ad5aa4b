"""Passkey retrieval in LM-Infinite's format (docs/evaluation.md#passkey-retrieval): a 5-digit key hidden at a
uniformly random depth in repeated filler, greedy decoding, correct if the first integer
generated is the key."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np

from lminf_jax.errors import UserError
from lminf_jax.eval.task import Axes, EvalTask, cells, register

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is "
NEW_TOKENS = 8  # (an answer is the key: 5 digits)


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


@register("passkey")
@dataclasses.dataclass(frozen=True)
class PasskeyTask(EvalTask):
  """`samples` prompts per length (one rng from `seed`, lengths in order), 8 new tokens, correct
  if the first integer is the key; grid: depth bucket x length."""

  lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
  samples_per_length: int = 20
  seed: int = 0
  depth_buckets: int = 5
  score_key: ClassVar[str] = "correct"

  def samples(self, tokenizer) -> dict[int, list[PasskeySample]]:
    rng = np.random.default_rng(self.seed)
    return {n: [make_sample(tokenizer, n, rng) for _ in range(self.samples_per_length)] for n in self.lengths}

  def new_tokens(self, group: int) -> int:
    return NEW_TOKENS

  def score(self, prediction: str, sample: PasskeySample) -> float:
    return float(first_integer(prediction) == sample.key)

  def result(self, sample: PasskeySample, prediction: str) -> dict:
    answer = first_integer(prediction)
    return dict(length=sample.length, depth=sample.depth, key=sample.key, answer=answer, correct=answer == sample.key,
                prompt_tokens=len(sample.token_ids))

  def axes(self) -> Axes:
    b = self.depth_buckets
    return Axes(list(range(b)), list(self.lengths), [f"{i * 100 // b}-{(i + 1) * 100 // b}%" for i in range(b)],
                [str(n) for n in self.lengths], "needle depth", "context length (tokens)", "accuracy")

  def cell(self, result: dict) -> tuple[int, int]:
    return depth_bucket(result["depth"], self.depth_buckets), result["length"]

  def table(self, results: list[dict], methods: list[str], seconds: float) -> str:
    """Per method and length: accuracy, and hits/samples per depth bucket."""
    b = self.depth_buckets
    header = " ".join(f"d{i * 100 // b:02d}-{(i + 1) * 100 // b:02d}" for i in range(b))
    lines = [f"{'method':<10} {'length':>7} {'accuracy':>9}   per depth bucket: {header}"]
    for method in methods:
      by_cell = cells(self, results, method)
      for length in self.lengths:
        hits = [by_cell.get((i, length), []) for i in range(b)]
        accuracy = sum(map(sum, hits)) / sum(map(len, hits))
        per_bucket = [f"{int(sum(h))}/{len(h)}" if h else "-" for h in hits]
        lines.append(f"{method:<10} {length:>7} {accuracy:>9.2f}   " + " ".join(f"{x:>7}" for x in per_bucket))
    return "\n".join(lines)

  def report(self, results: list[dict], methods: dict[str, str], seconds: float) -> dict:
    return dict(methods=methods, results=results)
