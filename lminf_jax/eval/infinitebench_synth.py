"""InfiniteBench's three retrieval tasks generated here, as its data script builds them
(`data/construct_synthetic_dataset.py`, OpenBMB/InfiniteBench at 88b3daa; "cd.py:N" below), each prompt
exactly a requested number of tokens under the model's own tokenizer.

- passkey (R.PK, cd.py:45-75): the context is N noise lines with the needle line after the first j of them,
  the key 5 random digits (leading zeros kept);
- number_string (R.Num, cd.py:9-42): the same with its own needle, the key 10 digits: 5 random ones, then 5
  times a digit repeated in place (at a random position among those so far);
- kv_retrieval (R.KV, cd.py:78-115, with lost-in-the-middle's scripts/make_kv_retrieval_data.py:36-44 for
  the records): the context "JSON data:\\n{...}" of N records "UUID": "UUID", the key asked the record at
  position int(depth * N).

Their scripts fix N per length for their tokenizer (5220 lines at 128K); here N is the most units whose
prompt fits `length` tokens (the prompt as the model's tokenizer encodes it, special tokens included). When
that prompt falls short, it takes one more unit and drops the tokens over `length` from inside the units
after the needle (else before it), last unit first: the end of a noise line before its newline, or the
inside of a record's quoted key and value (the JSON stays valid). Every other token is the text's own
tokenization. Needs a fast tokenizer (character offsets).
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from lminf_jax.errors import UserError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLES = {"passkey": ("The pass key is {key}. Remember it. {key} is the pass key.\n", "What is the pass key?"),
           "number_string": ("The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
                             "What is the sequence of digits?")}
KV_HEAD, KV_TAIL = "JSON data:\n{", "}"
KV_QUESTION = "\nKey: \"{key}\"\nThe value associated with the specified key is: "


class Synthetic(NamedTuple):
  token_ids: list[int]  # the prompt, exactly the requested length
  answer: str
  needle_at: int  # index of the first token reaching into the needle (the needle line; the asked record)
  units: int  # noise lines or records in the context (a cut one included)


class Context(NamedTuple):
  """A prompt as text: `head`, the units joined, `tail`; unit `needle` holds the answer."""

  head: str
  units: list[str]
  needle: int
  tail: str

  def text(self) -> str:
    return self.head + "".join(self.units) + self.tail


def depths(task: str, count: int) -> list[Fraction]:
  """The needle's depth in each of `count` samples, spread as theirs: the passkey and number_string lines
  j = 0, step, ..., N, both ends included (cd.py:29, 64); kv_retrieval's record int(i * N / count) for
  sample i (cd.py:95). Exact fractions, so that the line or record is theirs."""
  if task == "kv_retrieval":
    return [Fraction(i, count) for i in range(count)]
  return [Fraction(i, count - 1) if count > 1 else Fraction(0) for i in range(count)]


def passkey_key(rng: np.random.Generator) -> str:
  """5 digits, each uniform in 0-9 (cd.py:67-70)."""
  return "".join(str(d) for d in rng.integers(0, 10, 5))


def number_key(rng: np.random.Generator) -> str:
  """5 uniform digits, then for k = 0..4 the digit at a uniform position in [0, 4 + k] repeated there
  (cd.py:32-38): 10 digits."""
  digits = [str(d) for d in rng.integers(0, 10, 5)]
  for k in range(5):
    at = int(rng.integers(0, 5 + k))
    digits.insert(at, digits[at])
  return "".join(digits)


def _uuid(rng: np.random.Generator) -> str:
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _noise_spans(unit: str) -> list[tuple[int, int]]:
  return [(0, len(unit) - 1)]  # (all but the newline)


def _record_spans(unit: str) -> list[tuple[int, int]]:
  key_end = unit.index('"', 1)
  value_start = key_end + 4  # ('": "')
  return [(1, key_end), (value_start, unit.index('"', value_start))]


class Fitted(NamedTuple):
  token_ids: list[int]  # exactly the requested length
  context: Context  # its text (before any cut)
  needle_at: int  # the index of the first token reaching into the needle (it may begin before it)


def _units_that_fit(tokenizer, what: str, length: int, build: Callable[[int], Context], least: int) -> int:
  """The most units n >= `least` whose prompt `build(n)` fits `length` tokens, or n + 1 if it falls short:
  jumps by the tokens left over a unit's tokens until the bracket closes (the count grows with n)."""
  def count(n: int) -> int:
    return len(tokenizer(build(n).text())["input_ids"])

  lo, t_lo, hi = least, count(least), None  # (lo fits, with t_lo tokens; hi does not)
  if t_lo > length:
    raise UserError(f"InfiniteBench length {length} is too short for {what}: its template and needle take "
                    f"{t_lo} tokens")
  per_unit = max(1, len(tokenizer(build(least + 1).units[-1], add_special_tokens=False)["input_ids"]))
  while t_lo < length and (hi is None or hi - lo > 1):
    step = max(1, (length - t_lo) // per_unit)
    n = lo + step if hi is None else min(lo + step, hi - 1)
    t = count(n)
    if t <= length:
      lo, t_lo = n, t
    else:
      hi = n
  return lo if t_lo == length else hi


def _cut(tokenizer, what: str, length: int, context: Context,
         spans: Callable[[str], list[tuple[int, int]]]) -> Fitted:
  """The context's tokens less those over `length`: the last tokens lying inside `spans(unit)`, from the last
  unit after the needle back, then from the last unit before it back."""
  encoded = tokenizer(context.text(), return_offsets_mapping=True)
  ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
  real = [k for k, (s, e) in enumerate(offsets) if e > s]  # (special tokens have no characters)
  starts, ends = [offsets[k][0] for k in real], [offsets[k][1] for k in real]
  unit_at = np.cumsum([len(context.head)] + [len(u) for u in context.units]).tolist()  # (character offsets)
  needle_at = real[bisect.bisect_right(ends, unit_at[context.needle])]
  drop, excess = [], len(ids) - length
  order = list(range(len(context.units) - 1, context.needle, -1)) + list(range(context.needle - 1, -1, -1))
  for i in order:
    if len(drop) == excess:
      break
    for a, b in reversed(spans(context.units[i])):
      a, b = unit_at[i] + a, unit_at[i] + b
      inside = [real[j] for j in range(bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)) if ends[j] <= b]
      drop += inside[::-1][:excess - len(drop)]
  if len(drop) < excess:
    raise UserError(f"InfiniteBench {what} cannot be cut to {length} tokens under this tokenizer")
  dropped = set(drop)
  return Fitted([t for k, t in enumerate(ids) if k not in dropped], context,
                needle_at - sum(k < needle_at for k in dropped))


def fit(tokenizer, what: str, length: int, build: Callable[[int], Context], least: int,
        spans: Callable[[str], list[tuple[int, int]]]) -> Fitted:
  """The prompt of exactly `length` tokens from `build(n)` (n units, `least` at the fewest), as the module
  docstring says; `spans(unit)`: a unit's character ranges [start, end) whose tokens may be cut."""
  if not getattr(tokenizer, "is_fast", False):
    raise UserError("InfiniteBench's generated tasks need a fast tokenizer (a tokenizer.json): its character "
                    "offsets place the needle")
  return _cut(tokenizer, what, length, build(_units_that_fit(tokenizer, what, length, build, least)), spans)


def make_sample(tokenizer, task: str, template: str, length: int, depth: Fraction,
                rng: np.random.Generator) -> Synthetic:
  """One prompt of `task` (`template`: its prompt template, with {context} and {input}) of exactly `length`
  tokens, the needle at `depth` in [0, 1] of the context's units."""
  head, tail = template.split("{context}")
  if task in NEEDLES:
    needle, question = NEEDLES[task]
    key = (passkey_key if task == "passkey" else number_key)(rng)
    line, tail = needle.format(key=key), tail.format(input=question)

    def build(n: int) -> Context:
      j = int(depth * n + Fraction(1, 2))
      return Context(head, [NOISE] * j + [line] + [NOISE] * (n - j), j, tail)

    fitted = fit(tokenizer, task, length, build, 0, _noise_spans)
    return Synthetic(fitted.token_ids, key, fitted.needle_at, len(fitted.context.units) - 1)
  if task != "kv_retrieval":
    raise UserError(f"InfiniteBench {task} is read from its JSONL file, not generated")
  records: list[tuple[str, str]] = []
  keys: set[str] = set()

  def build(n: int) -> Context:
    while len(records) < n:  # (drawn in order: the same records whatever n the search tries)
      key = _uuid(rng)
      if key not in keys:
        keys.add(key)
        records.append((key, _uuid(rng)))
    asked = min(int(depth * n), n - 1)
    units = [f'"{k}": "{v}", ' for k, v in records[:n - 1]] + [f'"{records[n - 1][0]}": "{records[n - 1][1]}"']
    return Context(head + KV_HEAD, units, asked, KV_TAIL + tail.format(input=KV_QUESTION.format(key=records[asked][0])))

  fitted = fit(tokenizer, task, length, build, 1, _record_spans)
  return Synthetic(fitted.token_ids, records[fitted.context.needle][1], fitted.needle_at, len(fitted.context.units))
