"""One evaluation protocol: a task says what to ask and how to score it; one runner asks every
attention method, in left-padded batches, and reports.

A task (an `EvalTask` subclass: a frozen dataclass whose fields are its options) gives its
samples in groups (a batch never spans two groups), each group's new-token budget, its stop ids,
the score of a prediction, the fields of one answer's result, and the grid cell of a result.
`evaluate` returns one dict per (method, sample); `run` adds the progress bar, the printed
table, the JSON report and the heatmap. `EVAL_TASKS` names every registered task.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

EVAL_TASKS: dict[str, type[EvalTask]] = {}


def register(name: str):
  """Class decorator: adds an `EvalTask` subclass to `EVAL_TASKS` under `name`."""

  def add(cls: type[EvalTask]) -> type[EvalTask]:
    cls.name = name
    EVAL_TASKS[name] = cls
    return cls

  return add


class Axes(NamedTuple):
  """A task's grid: the row and column keys of its cells, their labels and names (for tables and plots)."""

  rows: list[Hashable]
  cols: list[Hashable]
  row_labels: list[str]
  col_labels: list[str]
  row_name: str = ""
  col_name: str = ""
  value_name: str = "score"


@dataclasses.dataclass(frozen=True)
class EvalTask(abc.ABC):
  """The protocol. Subclasses define `samples`, `new_tokens` and `score`; the rest has defaults.
  A sample is any named structure with `token_ids` (list[int], the prompt)."""

  name: ClassVar[str] = "task"
  score_key: ClassVar[str] = "score"  # the result field that the grid averages

  @abc.abstractmethod
  def samples(self, tokenizer) -> dict[Hashable, list]:
    """The samples in groups, in order (seeded by the task's own fields)."""

  @abc.abstractmethod
  def new_tokens(self, group: Hashable) -> int:
    """The most tokens generated for a sample of `group`."""

  @abc.abstractmethod
  def score(self, prediction: str, sample) -> float:
    """A decoded prediction's score, in [0, 1]."""

  def stop_ids(self, config, tokenizer) -> tuple[int, ...]:
    """Token ids that end an answer (default: the model's EOS)."""
    return tuple(config.eos_token_ids)

  def result(self, sample, prediction: str) -> dict:
    """One answer's JSON fields (after `method`): by default the sample's fields but the prompt,
    the prompt's length, the prediction and its score."""
    fields = {k: v for k, v in _fields(sample).items() if k != "token_ids"}
    return dict(fields, prompt_tokens=len(sample.token_ids), prediction=prediction,
                score=self.score(prediction, sample))

  def axes(self) -> Axes:
    """The grid (default: one cell)."""
    return Axes([None], [None], [self.name], ["all"])

  def cell(self, result: dict) -> tuple[Hashable, Hashable]:
    """The (row, column) of a result."""
    return None, None

  def table(self, results: list[dict], methods: list[str], seconds: float) -> str:
    """The printed table: per method and row, the mean score x 100 of each column."""
    axes = self.axes()
    lines = [f"{self.name} ({self.score_key} x 100), {seconds:.0f} s",
             f"{'method':<10} {axes.row_name or '':<16} " + " ".join(f"{c:>8}" for c in axes.col_labels)]
    for method in methods:
      for label, row in zip(axes.row_labels, score_grid(self, results, method)):
        lines.append(f"{method:<10} {label:<16} " + " ".join(f"{100 * x:>8.1f}" for x in row))
    return "\n".join(lines)

  def report(self, results: list[dict], methods: dict[str, str], seconds: float) -> dict:
    """The JSON report (`methods`: name -> repr of the attention method)."""
    return dict(task=self.name, methods=methods, seconds=seconds, results=results)


def _fields(sample) -> dict:
  return sample._asdict() if hasattr(sample, "_asdict") else dataclasses.asdict(sample)


def cells(task: EvalTask, results: list[dict], method: str) -> dict[tuple, list[float]]:
  """The values (float of `task.score_key`) of one method's results, by grid cell, in order."""
  out: dict[tuple, list[float]] = {}
  for r in results:
    if r["method"] == method:
      out.setdefault(task.cell(r), []).append(float(r[task.score_key]))
  return out


def score_grid(task: EvalTask, results: list[dict], method: str) -> np.ndarray:
  """Mean value [row, column] of one method's results over `task.axes()`; NaN where none fell."""
  axes, by_cell = task.axes(), cells(task, results, method)
  grid = np.full((len(axes.rows), len(axes.cols)), np.nan)
  for i, row in enumerate(axes.rows):
    for j, col in enumerate(axes.cols):
      if by_cell.get((row, col)):
        grid[i, j] = float(np.mean(by_cell[row, col]))
  return grid


def plot(path, task: EvalTask, results: list[dict], methods: list[str], title: str) -> None:
  """The heatmap of `score_grid`: a panel per method."""
  from lminf_jax.eval.plots import heatmap

  axes = task.axes()
  heatmap(path, {m: score_grid(task, results, m) for m in methods}, axes.col_labels, axes.row_labels, axes.col_name,
          axes.row_name, title, axes.value_name)


def evaluate(task: EvalTask, params, config, tokenizer, methods: dict, batch: int, chunk: int | None = None,
             progress: Callable[[int], None] | None = None, samples: dict | None = None) -> list[dict]:
  """Greedy answers of every method (name -> attention method) to every sample of `task`
  (`samples`, default `task.samples(tokenizer)`), `batch` prompts [B, T] left-padded per
  `generate` call, each prompt fed `chunk` tokens at a time (default: the method's); one dict
  per (method, sample): `method` then `task.result`. `progress(prompt tokens done)` after each batch."""
  from lminf_jax.inference.generation import generate

  samples = task.samples(tokenizer) if samples is None else samples
  stop = task.stop_ids(config, tokenizer)
  results = []
  for name, attention in methods.items():
    for group, rows in samples.items():
      for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        outputs = generate(params, config, [s.token_ids for s in part], task.new_tokens(group), attention,
                           chunk=chunk, eos_ids=stop)
        for sample, out in zip(part, outputs):
          results.append(dict(method=name, **task.result(sample, tokenizer.decode(out, skip_special_tokens=True))))
        if progress is not None:
          progress(sum(len(s.token_ids) for s in part))
  return results


def run(task: EvalTask, params, config, tokenizer, methods: dict, batch: int, chunk: int | None = None,
        json_path: str | Path | None = None, plot_path: str | Path | None = None, title: str = "") -> list[dict]:
  """`evaluate` with a progress bar, then prints `task.table`, writes `task.report` as JSON and
  (`plot_path`) the heatmap, each through an atomic file. Returns the results."""
  from tqdm import tqdm

  from lminf_jax.util.atomic import atomic_file

  samples = task.samples(tokenizer)
  total = len(methods) * sum(len(s.token_ids) for rows in samples.values() for s in rows)
  start = time.perf_counter()
  with tqdm(total=total, unit="tok", desc=task.name) as bar:
    results = evaluate(task, params, config, tokenizer, methods, batch, chunk, bar.update, samples)
  seconds = time.perf_counter() - start
  print(task.table(results, list(methods), seconds))
  if json_path is not None:
    report = task.report(results, {k: repr(v) for k, v in methods.items()}, seconds)
    with atomic_file(Path(json_path)) as tmp:
      tmp.write_text(json.dumps(report, indent=2))
    print(f"wrote {json_path}")
  if plot_path is not None:
    with atomic_file(Path(plot_path)) as tmp:
      plot(tmp, task, results, list(methods), title)
    print(f"wrote {plot_path}")
  return results
