"""InfiniteBench's scores (Zhang et al., 2024), re-derived from its `src/compute_scores.py`
(OpenBMB/InfiniteBench at 88b3daa; "cs.py:N" below): one scorer per task, from a decoded prediction and the
record's label to a score in [0, 1], as their `get_score_one` (cs.py:333-363) gives it for a chat-free model
(not "gpt4", whose Math.Calc answer drops its first number, cs.py:319-320).

A label is what their eval scripts store as `ground_truth` (`get_answer`, src/eval_utils.py:229-245): the
record's `answer`, or for Code.Debug and En.MC the pair [option text, option letter]. Their files hold lists
where their scorers take a scalar: each scorer takes a list's first item where theirs does, and also where
theirs does not but must (kv_retrieval, cs.py:139-143, compares the label itself; a list never matches), and
reads a number written as a string as that number (code_run, math_find). En.Sum's rougeLsum is the 🤗
Evaluate rouge metric's (rouge_score 0.1.2's `RougeScorer(["rougeLsum"])`, no stemmer), implemented here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from lminf_jax.errors import UserError
from lminf_jax.eval.longbench import qa_f1

OPTIONS = "ABCD"


def _first(label: Any) -> Any:
  return label[0] if isinstance(label, list) else label


def _words(text: str, marks: str) -> list[str]:
  """The whitespace-split words of `text` once each of `marks` is a space."""
  for mark in marks:
    text = text.replace(mark, " ")
  return text.split()


def _number(value: Any, what: str) -> int | float:
  """An int or float label; a string is read as one (an int if it is one)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  try:
    return int(value)
  except (TypeError, ValueError):
    try:
      return float(value)
    except (TypeError, ValueError):
      raise UserError(f"{what}: the answer {value!r} is not a number") from None


def first_digits(prediction: str) -> str:
  """The first run of digits 0-9 in the prediction, '' if none (cs.py:122-129)."""
  match = re.search(r"[0-9]+", prediction)
  return match.group() if match else ""


def passkey(prediction: str, label: Any) -> float:
  """passkey and number_string: the label equals the first digit run, as strings (cs.py:146-155)."""
  return float(str(_first(label)) == first_digits(prediction))


def kv_retrieval(prediction: str, label: Any) -> float:
  """The value is one of the prediction's words, split at whitespace and \\n : " ' . , ? ! { } (cs.py:139-143)."""
  return float(str(_first(label)) in _words(prediction, "\n:\"'.,?!{}"))


def code_run(prediction: str, label: Any) -> float:
  """The last word, split at whitespace and \\n . ` ' " :, read by int(), equals the label (cs.py:158-174)."""
  value = _number(_first(label), "code_run")
  words = _words(prediction.strip(), "\n.`'\":")
  try:
    return float(bool(words) and int(words[-1]) == value)
  except ValueError:
    return 0.0


def code_debug(prediction: str, label: list) -> float:
  """[function, letter]: the prediction starts "X." or "X:", or the text after the first of its answer
  prefixes found (after \\n ` ' " - * Option option became spaces and runs of spaces one) starts with the
  letter or the function (cs.py:177-212)."""
  function, letter = label[0], label[1]
  prediction = prediction.strip()
  if prediction[:2] in (f"{letter}.", f"{letter}:"):
    return 1.0
  for mark in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
    prediction = prediction.replace(mark, " ")
  while "  " in prediction:
    prediction = prediction.replace("  ", " ")
  return _after_prefix(prediction, ("answer is:", "is:", "answer:", "correct option is:"), (letter, function)) or 0.0


def _after_prefix(prediction: str, prefixes: tuple[str, ...], starts: tuple[str, ...]) -> float | None:
  """For the first prefix found: whether the text one character past it starts with one of `starts`
  (0 if nothing follows it); None if no prefix is found (cs.py:200-211, 267-278)."""
  for prefix in prefixes:
    at = prediction.find(prefix)
    if at == -1:
      continue
    rest = prediction[at + len(prefix) + 1:]
    return float(len(prediction) >= at + len(prefix) + 1 and any(rest.startswith(s) for s in starts))
  return None


def longbook_choice_eng(prediction: str, label: list) -> float:
  """[option text, letter]: the first character if it is A-D; else the whole prediction being the text
  or the letter; else the text after an answer prefix; else the first word that is a substring of "ABCD"
  (cs.py:247-285)."""
  prediction = prediction.strip()
  if not prediction:
    return 0.0
  if prediction[0] in OPTIONS:
    return float(prediction[0] in label)
  if prediction in label:
    return 1.0
  for mark in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
    prediction = prediction.replace(mark, " ")
  while "  " in prediction:
    prediction = prediction.replace("  ", " ")
  found = _after_prefix(prediction, ("answer is:", "answer:", "answer is", "option is"), tuple(label))
  if found is not None:
    return found
  for word in prediction.split():
    if word in OPTIONS:  # (a substring test, as theirs: "BC" counts)
      return float(word in label)
  return 0.0


def math_find(prediction: str, label: Any) -> float:
  """The first number (r"\\d+\\.\\d+|\\d+") equals the label, as an int if the label is one (cs.py:215-234;
  where theirs would stop on int("1.5"), the score is 0)."""
  label = _number(_first(label), "math_find")
  match = re.search(r"\d+\.\d+|\d+", prediction)
  if match is None:
    return 0.0
  if isinstance(label, int):
    return float("." not in match.group() and int(match.group()) == label)
  return float(float(match.group()) == label)


def math_calc(prediction: str, label: list) -> float:
  """The share of the expression's values (a list, or a list holding it) that the digit runs of the
  prediction give in order before the first wrong one (cs.py:306-330)."""
  values = label[0] if isinstance(label[0], list) else label
  values = [_number(v, "math_calc") for v in values]
  numbers = [int(x) for x in re.findall(r"[0-9]+", prediction)]
  right = 0
  for value, number in zip(values, numbers):
    if value != number:
      break
    right += 1
  return right / len(values)


def longdialogue_qa_eng(prediction: str, label: Any) -> float:
  """The first name of the label is one of the prediction's upper-cased words, split at whitespace and
  \\n : " ' . , ? ! { } (cs.py:237-244)."""
  name = label[0] if isinstance(label, list) else label
  return float(name in [w.upper() for w in _words(prediction.strip(), "\n:\"'.,?!{}")])


def longbook_qa_eng(prediction: str, label: Any) -> float:
  """The best token F1 over the answers, SQuAD-normalised (cs.py:16-32, 52-79: LongBench's qa F1)."""
  return max(qa_f1(prediction, truth) for truth in (label if isinstance(label, list) else [label]))


_ZH_PUNCTUATION = set(string.punctuation + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」"
                                           "『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_zh(text: str) -> str:
  """Lower case, ASCII and CJK punctuation dropped, all whitespace dropped (cs.py:35-49)."""
  return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION and not ch.isspace())


def longbook_qa_chn(prediction: str, label: Any) -> float:
  """The best F1 over the answers of the normalised characters (cs.py:82-101)."""
  best = 0.0
  for truth in label if isinstance(label, list) else [label]:
    pred, gold = list(normalize_zh(prediction)), list(normalize_zh(truth))
    same = sum((Counter(pred) & Counter(gold)).values())
    if same:
      precision, recall = same / len(pred), same / len(gold)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


# --- rougeLsum (rouge_score 0.1.2: tokenize.py, rouge_scorer.py) -------------------------------------------
def rouge_tokens(text: str) -> list[str]:
  """rouge_score's default tokens: lower case, every run of characters other than a-z 0-9 a space."""
  return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_indices(ref: list[str], cand: list[str]) -> list[int]:
  """The indices in `ref` of one longest common subsequence: rouge_score's table, read back from the end
  taking a match, else the left cell if it is larger, else the upper one."""
  table = [[0] * (len(cand) + 1) for _ in range(len(ref) + 1)]
  for i, r in enumerate(ref, 1):
    row, up = table[i], table[i - 1]
    for j, c in enumerate(cand, 1):
      row[j] = up[j - 1] + 1 if r == c else max(up[j], row[j - 1])
  i, j, out = len(ref), len(cand), []
  while i > 0 and j > 0:
    if ref[i - 1] == cand[j - 1]:
      out.append(i - 1)
      i, j = i - 1, j - 1
    elif table[i][j - 1] > table[i - 1][j]:
      j -= 1
    else:
      i -= 1
  return out[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
  """Summary-level ROUGE-L F (Lin 2004, section 3.2): sentences are the non-empty lines; each reference
  sentence's union LCS with the prediction's sentences counts its tokens, each token at most as often as
  it is left in both texts; F of hits / prediction tokens and hits / reference tokens."""
  ref = [rouge_tokens(s) for s in reference.split("\n") if s]
  cand = [rouge_tokens(s) for s in prediction.split("\n") if s]
  m, n = sum(map(len, ref)), sum(map(len, cand))
  if not m or not n:
    return 0.0
  left_ref, left_cand = Counter(t for s in ref for t in s), Counter(t for s in cand for t in s)
  hits = 0
  for sentence in ref:
    union = sorted(set().union(*(_lcs_indices(sentence, c) for c in cand)))
    for token in (sentence[i] for i in union):
      if left_ref[token] > 0 and left_cand[token] > 0:
        hits += 1
        left_ref[token] -= 1
        left_cand[token] -= 1
  precision, recall = hits / n, hits / m
  return 2 * precision * recall / (precision + recall) if hits else 0.0


def longbook_sum_eng(prediction: str, label: Any) -> float:
  """rougeLsum F against the summary, the best over a list of them (rouge_score's score_multi, which the
  metric uses when the reference is a list; cs.py:292-299)."""
  return max(rouge_lsum(prediction, truth) for truth in (label if isinstance(label, list) else [label]))


SCORERS: dict[str, Callable[[str, Any], float]] = {
    "passkey": passkey, "number_string": passkey, "kv_retrieval": kv_retrieval,
    "longbook_sum_eng": longbook_sum_eng, "longbook_choice_eng": longbook_choice_eng,
    "longbook_qa_eng": longbook_qa_eng, "longbook_qa_chn": longbook_qa_chn,
    "longdialogue_qa_eng": longdialogue_qa_eng, "math_find": math_find, "math_calc": math_calc,
    "code_run": code_run, "code_debug": code_debug,
}


def label(task: str, record: dict, where: str) -> Any:
  """The record's label as their eval scripts store it (src/eval_utils.py:229-245): Code.Debug's and
  En.MC's is [option text, letter] (from `answer`, the text or a one-item list of it, and `options`; or
  `answer` already such a pair); the others' is `answer` as it is."""
  answer = record["answer"]
  if task not in ("code_debug", "longbook_choice_eng"):
    return answer
  if isinstance(answer, list) and len(answer) == 2 and answer[1] in list(OPTIONS):
    return answer
  text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
  if not isinstance(text, str) or text not in record["options"][:4]:
    raise UserError(f"{where}: the answer {answer!r} is not one of the options")
  return [text, OPTIONS[record["options"].index(text)]]


def score(task: str, prediction: str, label: Any) -> float:
  """The prediction's score under the task's InfiniteBench scorer, in [0, 1]."""
  return float(SCORERS[task](prediction, label))
