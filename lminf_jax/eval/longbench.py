"""LongBench (Bai et al., 2024) tasks in its own JSONL format: prompts, middle truncation,
greedy answers and scores as LongBench's pred.py and eval.py define them (the English tasks).

A record (one JSON object per line, as a user downloads `data.zip`) has `input`, `context`,
`answers` (list), `all_classes` (list or null), `length` and `_id`. The prompt is the task's
template filled with `context` and `input`; a prompt longer than `max_length` tokens keeps its
first and last max_length/2 tokens (each half decoded, joined), then, except for the few-shot
and code tasks, it is wrapped in the tokenizer's chat template. A prediction scores the best of
its answers under the task's metric; a task's score is the mean x 100. ROUGE-L and the code
similarity come from the packages LongBench uses (`rouge`, and `thefuzz` for fuzzywuzzy's ratio:
the `[eval]` extra).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from lminf_jax.errors import UserError
from lminf_jax.eval import jsonl
from lminf_jax.eval.task import EvalTask, register, score_grid

FIELDS = ("input", "context", "answers", "all_classes", "length", "_id")


@dataclasses.dataclass(frozen=True)
class Task:
  """A LongBench task: its prompt template, max new tokens, metric, whether the prediction is cut
  to its first line before scoring, and whether the prompt is wrapped in the chat template."""

  template: str
  max_new_tokens: int
  metric: str
  first_line: bool = False
  chat: bool = True
  stop_at_newline: bool = False  # (samsum: generation stops at the first newline)


_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
                "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
                "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
_NARRATIVE = ("You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
              "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
              "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase "
              "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:")
_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                 "answered based on the information in the article, write \"unanswerable\". If the question is a "
                 "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
_QASPER = (f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\nArticle: "
           f"{{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\nQuestion: {{input}}"
           f"\n\nAnswer:")

# The English tasks of LongBench v1 (dataset2prompt, dataset2maxlen, dataset2metric).
TASKS: dict[str, Task] = {
    "narrativeqa": Task(_NARRATIVE, 128, "qa_f1"),
    "qasper": Task(_QASPER, 128, "qa_f1"),
    "multifieldqa_en": Task("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                            "question based on the above text, only give me the answer and do not output any other "
                            "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1"),
    "hotpotqa": Task(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": Task(_QA_PASSAGES, 32, "qa_f1"),
    "musique": Task(_QA_PASSAGES, 32, "qa_f1"),
    "gov_report": Task("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                       "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge_l"),
    "qmsum": Task("You are given a meeting transcript and a query containing a question or instruction. Answer the "
                  "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
                  "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_l"),
    "multi_news": Task("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                       "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    "trec": Task("Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
                 "{input}", 64, "classification", first_line=True, chat=False),
    "triviaqa": Task("Answer the question based on the given passage. Only give me the answer and do not output any "
                     "other words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1",
                     first_line=True, chat=False),
    "samsum": Task("Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}"
                   "\n\n{input}", 128, "rouge_l", first_line=True, chat=False, stop_at_newline=True),
    "passage_count": Task("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                          "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                          "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                          "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                          "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                          "\n\nThe final answer is: ", 32, "count"),
    "passage_retrieval_en": Task("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                                 "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                                 "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
                                 "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
                                 32, "retrieval"),
    "lcc": Task("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim", chat=False),
    "repobench-p": Task("Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim",
                        chat=False),
}


def task(name: str) -> Task:
  if name not in TASKS:
    raise UserError(f"unknown LongBench task {name!r} (English tasks: {', '.join(TASKS)})")
  return TASKS[name]


def read_jsonl(path: Path) -> list[dict]:
  """LongBench records, each checked for the fields and types LongBench's files have."""
  records = []
  for where, record in jsonl.read_jsonl(path):
    if not isinstance(record, dict):
      raise UserError(f"{where}: not a JSON object")
    missing = [f for f in FIELDS if f not in record]
    if missing:
      raise UserError(f"{where}: missing field {', '.join(repr(f) for f in missing)}")
    if not (isinstance(record["answers"], list) and record["answers"]
            and all(isinstance(a, str) for a in record["answers"])):
      raise UserError(f"{where}: 'answers' must be a non-empty list of strings")
    if not (isinstance(record["input"], str) and isinstance(record["context"], str)):
      raise UserError(f"{where}: 'input' and 'context' must be strings")
    if record["all_classes"] is not None and not isinstance(record["all_classes"], list):
      raise UserError(f"{where}: 'all_classes' must be a list or null")
    records.append(record)
  if not records:
    raise UserError(f"{path} holds no records")
  return records


def prompt_ids(spec: Task, record: dict, tokenizer, max_length: int) -> list[int]:
  """The prompt's token ids: the template filled, cut in the middle to `max_length` tokens as
  LongBench's pred.py does, then (for chat tasks, if the tokenizer has one) the chat template."""
  prompt = spec.template.format(context=record["context"], input=record["input"])
  ids = tokenizer(prompt)["input_ids"]
  if len(ids) > max_length and max_length < (least := len(tokenizer(spec.template.format(context="", input=record[
      "input"]))["input_ids"])):  # (a cut this short would keep pieces of the template, or repeat the middle)
    raise UserError(f"a max length of {max_length} tokens cannot hold the task's template and question "
                    f"({least} tokens without any context)")
  if len(ids) > max_length:
    half = max_length // 2
    prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
              + tokenizer.decode(ids[-half:], skip_special_tokens=True))
  if spec.chat and getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # (a BatchEncoding in recent transformers)
  return tokenizer(prompt)["input_ids"]


# --- metrics (LongBench's metrics.py) -----------------------------------------------------------
def normalize_answer(text: str) -> str:
  """Lower case, ASCII punctuation removed, articles removed, whitespace collapsed."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_f1(prediction: str, truth: str, all_classes=None) -> float:
  """Token F1 of the normalised answers."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
  same = sum((Counter(pred) & Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, truth: str, all_classes=None) -> float:
  """ROUGE-L F of the `rouge` package (LongBench's); 0 where it fails (an empty prediction)."""
  from rouge import Rouge

  try:
    return float(Rouge().get_scores([prediction], [truth], avg=True)["rouge-l"]["f"])
  except Exception:  # (as LongBench: any failure of the package scores 0)
    return 0.0


def classification(prediction: str, truth: str, all_classes) -> float:
  """1/m if the true class is among the m classes named in the prediction (classes that are
  substrings of the true one are not counted), else 0."""
  named = [c for c in all_classes or [] if c in prediction]
  named = [c for c in named if not (c in truth and c != truth)]
  return 1.0 / len(named) if truth in named else 0.0


def retrieval(prediction: str, truth: str, all_classes=None) -> float:
  """The share of the numbers in the prediction that are the true paragraph's ("Paragraph N")."""
  found = re.findall(r"Paragraph (\d+)", truth)
  numbers = re.findall(r"\d+", prediction)
  if not found or not numbers:
    return 0.0
  return sum(n == found[0] for n in numbers) / len(numbers)


def count(prediction: str, truth: str, all_classes=None) -> float:
  """The share of the numbers in the prediction that equal the count."""
  numbers = re.findall(r"\d+", prediction)
  return sum(n == str(truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim(prediction: str, truth: str, all_classes=None) -> float:
  """fuzzywuzzy's ratio / 100 between the true line and the prediction's first line without `, # or //."""
  from thefuzz import fuzz

  lines = prediction.lstrip("\n").split("\n")
  line = next((x for x in lines if not any(mark in x for mark in ("`", "#", "//"))), "")
  return fuzz.ratio(line, truth) / 100


PACKAGES = {"rouge_l": "rouge", "code_sim": "thefuzz"}  # (the metrics that need the `[eval]` extra)


def check_packages(spec: Task) -> None:
  """One-line refusal, before any work, if the task's metric needs a package that is not installed."""
  import importlib.util

  package = PACKAGES.get(spec.metric)
  if package and importlib.util.find_spec(package) is None:
    raise UserError(f"the {spec.metric} metric needs the {package} package: pip install 'lminf-jax[eval]'")


METRICS = {"qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification, "retrieval": retrieval,
           "count": count, "code_sim": code_sim}


def score(spec: Task, prediction: str, answers: list[str], all_classes) -> float:
  """A prediction's score in [0, 1]: the best over its answers (first line only, for the tasks that cut it)."""
  if spec.first_line:
    prediction = prediction.lstrip("\n").split("\n")[0]
  metric = METRICS[spec.metric]
  return max(metric(prediction, truth, all_classes) for truth in answers)


class LongBenchSample(NamedTuple):
  record: dict  # the JSONL record
  token_ids: list[int]  # its prompt


@register("longbench")
@dataclasses.dataclass(frozen=True)
class LongBenchTask(EvalTask):
  """A LongBench task (`task`: its name) over `records` (read by `read_jsonl` from `data`), prompts
  cut to `max_length` tokens; the task's new tokens, stops and metric; one grid cell."""

  task: str
  records: tuple[dict, ...] = dataclasses.field(repr=False)
  max_length: int
  data: str = ""

  @property
  def spec(self) -> Task:
    return task(self.task)

  def samples(self, tokenizer) -> dict[str, list[LongBenchSample]]:
    check_packages(self.spec)
    return {self.task: [LongBenchSample(r, prompt_ids(self.spec, r, tokenizer, self.max_length))
                        for r in self.records]}

  def new_tokens(self, group: str) -> int:
    return self.spec.max_new_tokens

  def stop_ids(self, config, tokenizer) -> tuple[int, ...]:
    eos = tuple(config.eos_token_ids)
    if self.spec.stop_at_newline:
      eos += (tokenizer("\n", add_special_tokens=False)["input_ids"][-1],)
    return eos

  def score(self, prediction: str, sample: LongBenchSample) -> float:
    return score(self.spec, prediction, sample.record["answers"], sample.record["all_classes"])

  def result(self, sample: LongBenchSample, prediction: str) -> dict:
    return dict(_id=sample.record["_id"], prompt_tokens=len(sample.token_ids), prediction=prediction,
                answers=sample.record["answers"], score=self.score(prediction, sample))

  def means(self, results: list[dict], methods: list[str]) -> dict[str, float]:
    """The mean score x 100 of each method."""
    return {m: 100 * float(score_grid(self, results, m)[0, 0]) for m in methods}

  def table(self, results: list[dict], methods: list[str], seconds: float) -> str:
    lines = [f"LongBench {self.task} ({self.spec.metric}, x 100), {len(self.records)} samples, max length "
             f"{self.max_length}, {seconds:.0f} s"]
    lines += [f"{name:<10} {mean:>7.2f}" for name, mean in self.means(results, methods).items()]
    return "\n".join(lines)

  def report(self, results: list[dict], methods: dict[str, str], seconds: float) -> dict:
    return dict(task=self.task, metric=self.spec.metric, max_length=self.max_length, data=self.data,
                methods=methods, mean=self.means(results, list(methods)), seconds=seconds, results=results)
