"""RULER's synthetic tasks (Hsieh et al., 2024), generated from a seed, with exact lengths.

Tasks, templates, needles and scoring are RULER's (scripts/data/synthetic and eval/synthetic of
NVIDIA/RULER): needle in a haystack (single, multi-key, multi-value, multi-query; haystacks of a
repeated noise sentence, real text, or distractor needles), variable tracking, common-words and
frequent-words extraction. Scoring is RULER's string_match_all: the share of the answers that
appear in the prediction, case-insensitively.

One difference in construction: a prompt is assembled from token ids under the model's own
tokenizer (template head, haystack units, needles, template tail with RULER's answer prefix),
so it is exactly the requested length, and each needle's first token has a known position
(its depth: that position in the haystack over the haystack's length). RULER instead counts
the prompt plus the tokens to generate against the length; here the prompt itself has it.
Needles go between haystack units (sentences) at the unit boundary nearest their drawn depth;
the haystack's last unit is cut to make the length exact.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import string
import uuid

import numpy as np

from lminf_jax.errors import UserError
from lminf_jax.eval.task import Axes, EvalTask, register, score_grid

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = np.round(np.linspace(0, 100, num=40)).astype(int)  # RULER's 40 needle depths (percent)

NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for "
                 "{query} mentioned in the provided text?")
NIAH_ANSWER = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclasses.dataclass(frozen=True)
class Niah:
  haystack: str  # "noise" (RULER's repeat), "essay" (real text) or "needle" (distractor needles)
  key: str  # "words", "numbers" or "uuids"
  value: str
  num_k: int = 1
  num_v: int = 1
  num_q: int = 1
  new_tokens: int = 128

  def build(self, task, b, words, length, rng, essay_text):
    return _niah(self, task, b, words, length, rng, _sentences(essay_text) if self.haystack == "essay" else [])


@dataclasses.dataclass(frozen=True)
class VariableTracking:
  num_chains: int = 1
  num_hops: int = 4
  new_tokens: int = 30

  def build(self, task, b, words, length, rng, essay_text):
    return _vt(self, task, b, length, rng)


@dataclasses.dataclass(frozen=True)
class CommonWords:
  freq_cw: int = 30
  freq_ucw: int = 3
  num_cw: int = 10
  new_tokens: int = 120

  def build(self, task, b, words, length, rng, essay_text):
    return _cwe(self, task, b, words, length, rng)


@dataclasses.dataclass(frozen=True)
class FrequentWords:
  alpha: float = 2.0
  new_tokens: int = 50

  def build(self, task, b, words, length, rng, essay_text):
    return _fwe(self, task, b, length, rng)


TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", num_q=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}


@dataclasses.dataclass
class Sample:
  task: str
  length: int  # requested (and actual) prompt length in tokens
  token_ids: list[int]
  answers: list[str]
  needle_at: list[int]  # token position of each needle's first token in the prompt (niah, vt)
  depths: list[float]  # each needle's position in the haystack / the haystack's length
  new_tokens: int


def task_names(text: str) -> list[str]:
  names = [t.strip() for t in text.split(",") if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise UserError(f"unknown RULER task {', '.join(unknown) or repr(text)} (choose from {', '.join(TASKS)})")
  return names


def string_match_all(prediction: str, answers: list[str]) -> float:
  """RULER's score of one prediction: the share of the answers found in it (case-insensitive),
  after its whitespace is stripped and control characters made newlines."""
  prediction = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
  return sum(a.lower() in prediction for a in answers) / len(answers)


# --- assembling token-exact prompts ---------------------------------------------------------------
class _Builder:
  """Token ids of text pieces under one tokenizer (no special tokens), cached."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.cache: dict[str, list[int]] = {}

  def ids(self, text: str) -> list[int]:
    if text not in self.cache:
      self.cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    return self.cache[text]


def _assemble(b: _Builder, length: int, task: str, head: str, tail: str, units, needles: list[str],
              depths_pct: list[int]):
  """Prompt ids of exactly `length` tokens: head, the haystack (units from the iterator `units`,
  the needles inserted at the unit boundaries nearest their depths, the last unit cut), tail.
  Returns (ids, needle token positions, needle depths in the haystack)."""
  head_ids, tail_ids = b.ids(head), b.ids(tail)
  needle_ids = [b.ids(n) for n in needles]
  room = length - len(head_ids) - len(tail_ids) - sum(map(len, needle_ids))
  if room < 0:
    raise UserError(f"RULER length {length} is too short for {task}: its template and needles take "
                    f"{length - room} tokens")
  hay, bounds = [], [0]  # haystack ids; token offsets of unit boundaries
  while len(hay) < room:
    unit = next(units, None)
    if unit is None:
      raise UserError(f"RULER {task} cannot fill {length} tokens: its word lists run out")
    hay += b.ids(unit if hay else unit.lstrip(" \n"))  # (the head ends with its own separator)
    bounds.append(len(hay))
  hay = hay[:room]
  bounds = [x for x in bounds if x <= room]
  targets = [min(bounds, key=lambda x: abs(x - room * d / 100)) for d in depths_pct]
  order = np.argsort(targets, kind="stable")
  ids, at, done = list(head_ids), [0] * len(needles), 0
  for i in order:
    ids += hay[done:targets[i]]
    done = targets[i]
    at[i] = len(ids)
    ids += needle_ids[i]
  ids += hay[done:] + tail_ids
  hay_len = room + sum(map(len, needle_ids))
  depths = [(at[i] - len(head_ids)) / max(hay_len, 1) for i in range(len(needles))]
  return ids, at, depths


@functools.cache
def _sentences(text: str) -> list[str]:
  """The text's sentences, each with its leading space (so that they join back into the text)."""
  parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
  return [" " + p for p in parts if p]


class Words:
  """RULER's word sources: wonderwords' adjective, noun and verb lists (the `[eval]` extra)."""

  def __init__(self):
    try:
      from wonderwords import random_word
    except ImportError:
      raise UserError("lminf ruler needs the wonderwords package: pip install 'lminf-jax[eval]'") from None
    load = random_word._get_words_from_text_file
    self.nouns, self.adjs, self.verbs = load("nounlist.txt"), load("adjectivelist.txt"), load("verblist.txt")
    self.pool = sorted(set(self.nouns + self.adjs + self.verbs))

  def draw(self, kind: str, rng: np.random.Generator) -> str:
    if kind == "numbers":
      return str(int(rng.integers(10**6, 10**7)))
    if kind == "uuids":
      return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return f"{self.adjs[rng.integers(len(self.adjs))]}-{self.nouns[rng.integers(len(self.nouns))]}"


def _niah(spec: Niah, task: str, b: _Builder, words: Words, length: int, rng, essay: list[str]):
  num_k = max(spec.num_k, spec.num_q)
  keys, values, needles = [], [], []
  for _ in range(num_k):
    keys.append(words.draw(spec.key, rng))
    values.append([words.draw(spec.value, rng) for _ in range(spec.num_v)])
    needles += [NEEDLE.format(type_v=spec.value, key=keys[-1], value=v) for v in values[-1]]
  needles = [needles[i] for i in rng.permutation(len(needles))]
  asked = rng.choice(num_k, spec.num_q, replace=False)
  queries = [keys[i] for i in asked]
  answers = [v for i in asked for v in values[i]]
  query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
  template, answer, type_v = NIAH_TEMPLATE, NIAH_ANSWER, spec.value
  if spec.num_q * spec.num_v == 1:  # RULER's singular rewrite
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
      template, answer = template.replace(old, new), answer.replace(old, new)
    type_v = type_v[:-1]
  head, tail = template.split("{context}")

  def lines():  # RULER's noise or needle haystack: a unit per line
    while True:
      yield "\n" + (NOISE if spec.haystack == "noise" else
                    NEEDLE.format(type_v=spec.value, key=words.draw(spec.key, rng), value=words.draw(spec.value, rng)))

  essay_units = spec.haystack == "essay"
  units = itertools.islice(itertools.cycle(essay), int(rng.integers(len(essay))), None) if essay_units else lines()
  fill = dict(type_v=type_v, query=query)
  return _assemble(b, length, task, head.format(**fill), (tail + answer).format(**fill), units,
                   [(" " if essay_units else "\n") + n for n in needles],
                   list(rng.choice(DEPTHS, len(needles), replace=False))), answers


def _names(rng, count: int, letters: int = 5) -> list[str]:
  names: list[str] = []
  while len(names) < count:
    name = "".join(rng.choice(list(string.ascii_uppercase), letters))
    if name not in names:
      names.append(name)
  return names


def _vt_chain(spec: VariableTracking, rng, letters: int = 5) -> tuple[list[str], str, list[str]]:
  """Chain 0's statements (first), the other chains', the value, chain 0's names."""
  names = _names(rng, (spec.num_hops + 1) * spec.num_chains, letters)
  statements, value = [], ""
  for c in range(spec.num_chains):
    chain = names[c * (spec.num_hops + 1):(c + 1) * (spec.num_hops + 1)]
    number = str(int(rng.integers(10000, 99999)))
    value = value or number
    statements += [f"VAR {chain[0]} = {number}."] + [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in
                                                      range(spec.num_hops)]
  return statements, value, names[:spec.num_hops + 1]


def _vt(spec: VariableTracking, task: str, b: _Builder, length: int, rng):
  # RULER's one-shot example first: a short chain in a few noise sentences, with its answer.
  example, ex_value, ex_names = _vt_chain(spec, rng, letters=3)
  noise = [NOISE] * 5
  for j, at in enumerate(sorted(rng.choice(len(noise), len(example), replace=False))):
    noise.insert(at + j, example[j])
  fill = dict(num_v=spec.num_hops + 1)
  shot = (VT_TEMPLATE + VT_ANSWER).format(context=" ".join(noise), query=ex_value, **fill) + " ".join(ex_names)
  statements, value, answers = _vt_chain(spec, rng)
  head, tail = VT_TEMPLATE.split("{context}")
  depths = sorted(rng.choice(DEPTHS, len(statements), replace=False))  # (the chains' order kept)
  return _assemble(b, length, task, shot + "\n\n" + head, (tail + VT_ANSWER).format(query=value, **fill),
                   itertools.repeat(" " + NOISE), [" " + s for s in statements], depths), answers


def _cwe(spec: CommonWords, task: str, b: _Builder, words: Words, length: int, rng):
  def numbered(chosen: list[str], common: int, freq_cw: int, freq_ucw: int) -> tuple[list[str], list[str]]:
    """The numbered list (shuffled) in which the first `common` chosen words appear freq_cw times."""
    items = chosen[:common] * freq_cw + chosen[common:] * freq_ucw
    items = [items[i] for i in rng.permutation(len(items))]
    return [f" {i + 1}. {w}" for i, w in enumerate(items)], chosen[:common]

  short = length < 4096
  ex_items, ex_answers = numbered([str(w) for w in rng.choice(words.pool, 20 if short else 40, replace=False)], spec.num_cw,
                                  3 if short else 10, 1 if short else 3)
  shot = (CWE_TEMPLATE + CWE_ANSWER).format(context="".join(ex_items).lstrip()) + "".join(
      f" {i + 1}. {w}" for i, w in enumerate(ex_answers)) + "\n"
  head, tail = CWE_TEMPLATE.split("{context}")
  head_ids, tail_ids = b.ids(shot + head), b.ids(tail + CWE_ANSWER)
  room = length - len(head_ids) - len(tail_ids)
  freq_cw, freq_ucw = (6, 1) if short else (spec.freq_cw, spec.freq_ucw)
  # Enough words that the list covers the room (it is cut): grown until it does.
  uncommon = max(1, int((room / 6 - spec.num_cw * freq_cw) / freq_ucw))
  while True:
    chosen = [str(w) for w in rng.choice(words.pool, min(len(words.pool), spec.num_cw + uncommon), replace=False)]
    items, answers = numbered(chosen, spec.num_cw, freq_cw, freq_ucw)
    tokens = sum(len(b.ids(x)) for x in items)
    if tokens >= room or len(chosen) == len(words.pool):
      break
    uncommon = int(uncommon * 1.1 * room / tokens) + 1
  return _assemble(b, length, task, shot + head, tail + CWE_ANSWER, iter(items), [], []), [str(a) for a in answers]


def _fwe(spec: FrequentWords, task: str, b: _Builder, length: int, rng):
  vocab = sorted({"".join(rng.choice(list(string.ascii_lowercase), 6)) for _ in range(max(4, length // 50))})
  vocab = [vocab[i] for i in rng.permutation(len(vocab))]
  vocab[0] = "..."
  zeta = float(np.sum(np.arange(1, 10**6, dtype=np.float64) ** -spec.alpha))
  head, tail = FWE_TEMPLATE.split("{context}")
  room = length - len(b.ids(head)) - len(b.ids(tail + FWE_ANSWER))
  total = room  # words drawn (RULER's num_words), grown until the text covers the room (it is cut)
  while True:
    words = [" " + w for k, w in enumerate(vocab, 1) for _ in range(int(total * k ** -spec.alpha / zeta))]
    if sum(len(b.ids(w)) for w in words) >= room:
      break
    total = int(total * 1.2) + 1
  words = [words[i] for i in rng.permutation(len(words))]
  return _assemble(b, length, task, head, tail + FWE_ANSWER, iter(words), [], []), vocab[1:4]


def make_sample(tokenizer, task: str, length: int, rng: np.random.Generator, essay_text: str,
                words: Words | None = None, builder: _Builder | None = None) -> Sample:
  """One sample of `task` whose prompt is exactly `length` tokens under `tokenizer`."""
  spec = TASKS[task]
  (ids, at, depths), answers = spec.build(task, builder or _Builder(tokenizer), words or Words(), length, rng,
                                          essay_text)
  return Sample(task, length, ids, answers, at, depths, spec.new_tokens)


def generate_samples(tokenizer, tasks: list[str], lengths: list[int], samples: int, seed: int,
                     essay_text: str) -> dict[tuple[str, int], list[Sample]]:
  """`samples` samples per (task, length), each from its own seed (seed, task, length, index)."""
  essays = [t for t in tasks if getattr(TASKS[t], "haystack", None) == "essay"]
  if essays and not _sentences(essay_text):
    raise UserError(f"the haystack text is empty, and {essays[0]} fills its haystack with it")
  words, builder = Words(), _Builder(tokenizer)
  return {(task, length): [make_sample(tokenizer, task, length,
                                       np.random.default_rng([seed, list(TASKS).index(task), length, i]),
                                       essay_text, words, builder) for i in range(samples)]
          for task in tasks for length in lengths}


@register("ruler")
@dataclasses.dataclass(frozen=True)
class RulerTask(EvalTask):
  """`samples_per_cell` samples per (RULER task, length) from `seed`; RULER's new tokens per task;
  string_match_all; grid: task x length. `essay`: the essay haystacks' text."""

  tasks: tuple[str, ...] = tuple(TASKS)
  lengths: tuple[int, ...] = (4096, 8192, 16384)
  samples_per_cell: int = 10
  seed: int = 0
  essay: str = dataclasses.field(default="", repr=False)

  def samples(self, tokenizer) -> dict[tuple[str, int], list[Sample]]:
    return generate_samples(tokenizer, list(self.tasks), list(self.lengths), self.samples_per_cell, self.seed,
                            self.essay)

  def new_tokens(self, group: tuple[str, int]) -> int:
    return TASKS[group[0]].new_tokens

  def score(self, prediction: str, sample: Sample) -> float:
    return string_match_all(prediction, sample.answers)

  def result(self, sample: Sample, prediction: str) -> dict:
    return dict(task=sample.task, length=sample.length, prompt_tokens=len(sample.token_ids), needle_at=sample.needle_at,
                depths=sample.depths, answers=sample.answers, prediction=prediction,
                score=self.score(prediction, sample))

  def axes(self) -> Axes:
    return Axes(list(self.tasks), list(self.lengths), list(self.tasks), [str(n) for n in self.lengths], "task",
                "context length (tokens)", "score")

  def cell(self, result: dict) -> tuple[str, int]:
    return result["task"], result["length"]

  def table(self, results: list[dict], methods: list[str], seconds: float) -> str:
    """Per method and task, the score x 100 per length, and the mean over the tasks."""
    lines = [f"RULER score (string_match_all x 100), {self.samples_per_cell} samples per cell, {seconds:.0f} s",
             f"{'method':<10} {'task':<16} " + " ".join(f"{n:>8}" for n in self.lengths)]
    for method in methods:
      grid = score_grid(self, results, method)
      for task, row in zip(list(self.tasks) + ["mean"], list(grid) + [np.nanmean(grid, axis=0)]):
        lines.append(f"{method:<10} {task:<16} " + " ".join(f"{100 * x:>8.1f}" for x in row))
    return "\n".join(lines)

  def report(self, results: list[dict], methods: dict[str, str], seconds: float) -> dict:
    return dict(methods=methods, tasks=list(self.tasks), lengths=list(self.lengths), samples=self.samples_per_cell,
                seed=self.seed, seconds=seconds, results=results)
