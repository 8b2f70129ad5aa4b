"""The evaluation protocol (lminf_jax.eval.task): a task defined here, outside the package, runs
through the runner on the tiny model; its answers equal a direct generate + decode + score."""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import numpy as np

from lminf_jax.attention import Dense, Lambda
from lminf_jax.eval import EVAL_TASKS
from lminf_jax.eval.task import Axes, EvalTask, register, run, score_grid
from lminf_jax.inference.generation import generate


class Numbers:
  """A tokenizer of the tiny vocabulary: an id is its decimal number."""

  def __init__(self, special: tuple[int, ...]):
    self.special = special

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) in self.special))


class Echo(NamedTuple):
  length: int
  token_ids: list[int]
  target: int


@register("echo")
@dataclasses.dataclass(frozen=True)
class EchoTask(EvalTask):
  """Random prompts; the score is 1 if the prompt's last token comes back among the answer's."""

  lengths: tuple[int, ...] = (9, 14)
  count: int = 3
  seed: int = 0

  def samples(self, tokenizer) -> dict[int, list[Echo]]:
    rng = np.random.default_rng(self.seed)
    out = {}
    for n in self.lengths:
      ids = [rng.integers(3, 90, n).tolist() for _ in range(self.count)]
      out[n] = [Echo(n, p, p[-1]) for p in ids]
    return out

  def new_tokens(self, group: int) -> int:
    return 4

  def score(self, prediction: str, sample: Echo) -> float:
    return float(str(sample.target) in prediction.split())

  def axes(self) -> Axes:
    return Axes([None], list(self.lengths), ["echo"], [str(n) for n in self.lengths], "", "length")

  def cell(self, result: dict) -> tuple:
    return None, result["length"]


def test_a_task_outside_the_package_matches_direct_generation(tiny_model, tmp_path, capsys):
  config, params, _ = tiny_model
  tokenizer = Numbers(tuple(config.eos_token_ids))
  methods = {"dense": Dense(), "lambda": Lambda(n_global=2, n_local=6)}
  task = EVAL_TASKS["echo"](count=3)
  results = run(task, params, config, tokenizer, methods, batch=2, json_path=tmp_path / "e.json",
                plot_path=tmp_path / "e.png", title="echo")

  expected = []  # (the reference: the same prompts, two at a time, through generate, decoded and scored here)
  for name, attention in methods.items():
    for n, group in task.samples(tokenizer).items():
      for start in (0, 2):
        part = group[start:start + 2]
        for sample, out in zip(part, generate(params, config, [s.token_ids for s in part], 4, attention)):
          text = tokenizer.decode(out, skip_special_tokens=True)
          expected.append(dict(method=name, length=n, target=sample.target, prompt_tokens=n, prediction=text,
                               score=float(str(sample.target) in text.split())))
  assert results == expected
  report = json.loads((tmp_path / "e.json").read_text())
  assert report["results"] == expected and report["task"] == "echo" and set(report["methods"]) == set(methods)
  assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  grid = score_grid(task, results, "dense")
  for j, n in enumerate(task.lengths):
    assert grid[0, j] == np.mean([r["score"] for r in expected if (r["method"], r["length"]) == ("dense", n)])
  out = capsys.readouterr().out
  assert "echo" in out and f"wrote {tmp_path / 'e.json'}" in out


def test_the_built_in_tasks_are_registered():
  assert {"passkey", "ruler", "longbench", "infinitebench"} <= set(EVAL_TASKS)
  assert all(issubclass(cls, EvalTask) and cls.name == name for name, cls in EVAL_TASKS.items())
