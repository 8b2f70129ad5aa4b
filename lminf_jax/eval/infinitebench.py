"""InfiniteBench (Zhang et al., 2024, "∞Bench"; OpenBMB/InfiniteBench at 88b3daa), the benchmark of the
InfLLM paper, as one evaluation task: prompts, new-token budgets and scores as its eval code gives them
for a chat-free model (the templates `src/eval_yarn_mistral.py` uses, `yarn_mistral_templates` of
src/prompt.py:17-30, no chat template).

Its three retrieval tasks (passkey, number_string, kv_retrieval) are generated here
(`lminf_jax.eval.infinitebench_synth`), each prompt exactly a requested length; every task, those three
included, can instead be read from InfiniteBench's JSONL files as a user downloads them (`<task>.jsonl`,
records with `context`, `input`, `answer`, `options`, `id`), each prompt cut in its middle to each
requested length as src/eval_yarn_mistral.py:26-45 does. Scores: `lminf_jax.eval.infinitebench_scores`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from lminf_jax.errors import UserError
from lminf_jax.eval import jsonl
from lminf_jax.eval import infinitebench_scores as scores
from lminf_jax.eval.infinitebench_synth import depths, make_sample
from lminf_jax.eval.task import Axes, EvalTask, register, score_grid


@dataclasses.dataclass(frozen=True)
class Task:
  """An InfiniteBench task: the paper's name, its prompt template (src/prompt.py:17-30) and its new-token
  budget (src/eval_utils.py:36-49)."""

  paper: str
  template: str
  max_new_tokens: int


_BOOK = "Read the book and answer the question."
# In the order of their DATA_NAME_TO_PATH (src/eval_utils.py:16-34).
TASKS: dict[str, Task] = {
    "passkey": Task("R.PK", "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                    "it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass "
                    "key is", 6),
    "number_string": Task("R.Num", "There is an important info hidden inside a lot of irrelevant text. Find it. I will "
                          "quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence "
                          "of digits is", 12),
    "kv_retrieval": Task("R.KV", "Extract the value corresponding to the specified key in the JSON object below.\n\n"
                         "{context}\n\n{input}", 50),
    "longbook_sum_eng": Task("En.Sum", "Summarize the book below.\n\n{context}\n\nSummary:", 1200),
    "longbook_choice_eng": Task("En.MC", _BOOK + "\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\n"
                                "C. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is", 40),
    "longbook_qa_eng": Task("En.QA", "Read the book and answer the question. Be very concise in your answer.\n\n"
                            "{context}\n\nQuestion: {question}\nAnswer:", 40),
    "longbook_qa_chn": Task("Zh.QA", "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：", 40),
    "longdialogue_qa_eng": Task("En.Dia", "Below is a dialogue script where one random occurrence of a character name "
                                "is replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n"
                                "{context}\n\nThe name that has been replaced with $$MASK$$ is likely", 40),
    "math_find": Task("Math.Find", "{prefix}\n\n{context}\n\n{input}", 3),
    "math_calc": Task("Math.Calc", "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + "
                      "4\nValues: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: "
                      "{context}\nValues:", 30000),
    "code_run": Task("Code.Run", "There is a function called {func} in the following Python code.\n\n{context}\n\n"
                     "Please compute the exact value of {func_call}. The value of {func_call} is", 5),
    "code_debug": Task("Code.Debug", "Following is a Python code where exactly one of the functions/methods has a "
                       "deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\n"
                       "C. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:", 5),
}
GENERATED = ("passkey", "number_string", "kv_retrieval")
GENERATED_SAMPLES = 10  # (per task and length, unless given)


def task_names(text: str) -> list[str]:
  names = [t.strip() for t in text.split(",") if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise UserError(f"unknown InfiniteBench task {', '.join(unknown) or repr(text)} (choose from {', '.join(TASKS)})")
  return names


# --- records and prompts (src/eval_utils.py) --------------------------------------------------------------
def _check_record(task: str, record: Any, where: str) -> None:
  if not isinstance(record, dict):
    raise UserError(f"{where}: not a JSON object")
  missing = [f for f in ("context", "input", "answer") if f not in record]
  if task in ("code_debug", "longbook_choice_eng") and "options" not in record:
    missing.append("options")
  if missing:
    raise UserError(f"{where}: missing field {', '.join(repr(f) for f in missing)}")
  if not (isinstance(record["context"], str) and isinstance(record["input"], str)):
    raise UserError(f"{where}: 'context' and 'input' must be strings")
  if record["answer"] in ("", [], None):
    raise UserError(f"{where}: empty 'answer'")
  if task == "math_calc" and not isinstance(record["answer"], list):
    raise UserError(f"{where}: math_calc's 'answer' must be a list of the expression's values")
  options = record.get("options")
  if task in ("code_debug", "longbook_choice_eng") and not (
      isinstance(options, list) and len(options) >= 4 and all(isinstance(o, str) for o in options[:4])):
    raise UserError(f"{where}: 'options' must be a list of 4 strings")
  if task == "code_run" and not re.search(r"func_[0-9]+\(-?[0-9]+\)", record["input"]):
    raise UserError(f"{where}: code_run's 'input' names no call func_N(X)")
  if task == "math_find" and not re.search(r"The .+ of", record["input"]):
    raise UserError(f"{where}: math_find's 'input' names no \"The ... of\"")
  scores.label(task, record, where)  # (the option letter of Code.Debug and En.MC)


def read_jsonl(path: Path, task: str, limit: int | None = None) -> list[dict]:
  """The first `limit` records (all if None) of an InfiniteBench JSONL file, read line by line, each checked
  for the fields `task`'s prompt and label use; blank lines skipped (src/compute_scores.py:108-119)."""
  if not Path(path).exists():
    raise UserError(f"no InfiniteBench data for {task}: {path} does not exist")
  records = []
  for where, record in jsonl.read_jsonl(path):
    if limit is not None and len(records) == limit:
      break
    _check_record(task, record, where)
    records.append(record)
  if not records:
    raise UserError(f"{path} holds no records")
  return records


def read_records(tasks: list[str], data_dir: str | Path, limit: int | None = None) -> dict[str, tuple[dict, ...]]:
  """Each task's records from `data_dir`/<task>.jsonl."""
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise UserError(f"no InfiniteBench data directory {data_dir}")
  return {task: tuple(read_jsonl(data_dir / f"{task}.jsonl", task, limit)) for task in tasks}


def prompt_text(task: str, record: dict) -> str:
  """The record's prompt (src/eval_utils.py:102-226): Code.Run names the first call func_N(X) of the input
  and its function, Math.Find asks "What is <the words between 'The' and 'of'> in the following list?", the
  multiple-choice tasks list options A-D, the book tasks ask the input as the question."""
  template, record_input = TASKS[task].template, record["input"]
  fields = dict(context=record["context"], input=record_input)
  if task == "code_run":
    call = re.findall(r"func_[0-9]+\(-?[0-9]+\)", record_input)[0]
    fields.update(func=call.split("(")[0], func_call=call)
  elif task in ("code_debug", "longbook_choice_eng"):
    fields.update({f"OPTION_{letter}": option for letter, option in zip("ABCD", record["options"])})
  elif task == "math_find":
    fields.update(prefix=f"What is {re.findall(r'The .+ of', record_input)[0].lower()[:-3]} in the following list?")
  fields.update(question=record_input)
  return template.format(**fields)


def prompt_ids(tokenizer, task: str, record: dict, length: int) -> list[int]:
  """The record's prompt as token ids (special tokens included); a prompt longer than `length` keeps its
  first and last length // 2 tokens, decoded as one text without special tokens and encoded again
  (src/eval_yarn_mistral.py:26-45, then :73)."""
  ids = tokenizer(prompt_text(task, record))["input_ids"]
  if len(ids) <= length:
    return list(ids)
  least = len(tokenizer(prompt_text(task, dict(record, context="")))["input_ids"])
  if length < least:  # (a cut this short would keep pieces of the instruction and question only)
    raise UserError(f"InfiniteBench length {length} is too short for {task}: its template and question take "
                    f"{least} tokens without any context")
  half = length // 2
  return list(tokenizer(tokenizer.decode(ids[:half] + ids[-half:], skip_special_tokens=True))["input_ids"])


@dataclasses.dataclass
class Sample:
  task: str
  length: int  # the requested length: the prompt's (generated), the cut's (read)
  id: Any  # the sample's index (generated), the record's id (read: its line's index where it has none)
  token_ids: list[int]
  label: Any  # what the scorer compares with (the answer; [text, letter] for Code.Debug and En.MC)
  depth: float | None  # the needle's place in the context, in [0, 1] (generated)
  needle_at: int | None  # the index of the first token reaching into the needle (generated)


def generate_samples(tokenizer, task: str, length: int, count: int, seed: int) -> list[Sample]:
  """`count` generated samples of `task` at exactly `length` tokens, sample i from the rng
  (seed, task, length, i), its needle at the i-th of InfiniteBench's depths."""
  out = []
  for i, depth in enumerate(depths(task, count)):
    rng = np.random.default_rng([seed, list(TASKS).index(task), length, i])
    s = make_sample(tokenizer, task, TASKS[task].template, length, depth, rng)
    out.append(Sample(task, length, i, s.token_ids, s.answer, float(depth), s.needle_at))
  return out


def read_samples(tokenizer, task: str, length: int, records: tuple[dict, ...]) -> list[Sample]:
  """A sample per record, its prompt cut to `length` tokens."""
  return [Sample(task, length, r.get("id", i), prompt_ids(tokenizer, task, r, length),
                 scores.label(task, r, f"{task} record {i}"), None, None) for i, r in enumerate(records)]


def check_sources(tasks, records: dict) -> None:
  """Refuses a task that is neither read (in `records`) nor generated."""
  missing = [t for t in tasks if t not in records and t not in GENERATED]
  if missing:
    raise UserError(f"InfiniteBench {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} read from "
                    f"InfiniteBench's JSONL files: give their directory (--data-dir)")


@register("infinitebench")
@dataclasses.dataclass(frozen=True)
class InfiniteBenchTask(EvalTask):
  """InfiniteBench's `tasks` at each of `lengths` tokens: a task in `records` (task -> its JSONL records,
  `read_records`) is read, each record's prompt cut to each length; passkey, number_string and
  kv_retrieval otherwise generated, `samples` per length (default 10) from `seed`. Each task's new-token
  budget and scorer; grid: task x length."""

  tasks: tuple[str, ...] = GENERATED
  lengths: tuple[int, ...] = (16384, 32768)
  samples_per_cell: int | None = None
  seed: int = 0
  records: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
  data_dir: str | None = None  # (where `records` came from, for the report)

  def samples(self, tokenizer) -> dict[tuple[str, int], list[Sample]]:
    check_sources(self.tasks, self.records)
    count = self.samples_per_cell or GENERATED_SAMPLES
    return {(task, n): (read_samples(tokenizer, task, n, self.records[task][:self.samples_per_cell])
                        if task in self.records else
                        generate_samples(tokenizer, task, n, count, self.seed))
            for task in self.tasks for n in self.lengths}

  def new_tokens(self, group: tuple[str, int]) -> int:
    return TASKS[group[0]].max_new_tokens

  def score(self, prediction: str, sample: Sample) -> float:
    return scores.score(sample.task, prediction, sample.label)

  def result(self, sample: Sample, prediction: str) -> dict:
    return dict(task=sample.task, length=sample.length, id=sample.id, prompt_tokens=len(sample.token_ids),
                depth=sample.depth, needle_at=sample.needle_at, label=sample.label, prediction=prediction,
                score=self.score(prediction, sample))

  def axes(self) -> Axes:
    return Axes(list(self.tasks), list(self.lengths), [f"{t} ({TASKS[t].paper})" for t in self.tasks],
                [str(n) for n in self.lengths], "task", "context length (tokens)", "score")

  def cell(self, result: dict) -> tuple[str, int]:
    return result["task"], result["length"]

  def table(self, results: list[dict], methods: list[str], seconds: float) -> str:
    """Per method and task, the mean score x 100 per length, and the mean over the tasks."""
    lines = [f"InfiniteBench (score x 100), {seconds:.0f} s",
             f"{'method':<10} {'task':<32} " + " ".join(f"{n:>8}" for n in self.lengths)]
    labels = self.axes().row_labels + ["mean"]
    for method in methods:
      grid = score_grid(self, results, method)
      for label, row in zip(labels, list(grid) + [np.nanmean(grid, axis=0)]):
        lines.append(f"{method:<10} {label:<32} " + " ".join(f"{100 * x:>8.1f}" for x in row))
    return "\n".join(lines)

  def report(self, results: list[dict], methods: dict[str, str], seconds: float) -> dict:
    return dict(task=self.name, methods=methods, tasks=list(self.tasks), lengths=list(self.lengths),
                read=sorted(set(self.tasks) & set(self.records)), data_dir=self.data_dir,
                samples=self.samples_per_cell, seed=self.seed, seconds=seconds, results=results)
