"""LongBench (lminf_jax.eval.longbench): its metrics on hand-written cases, the metric and template per
task, the middle truncation, the JSONL checks, and `lminf longbench` end to end on SmolLM2 with
small JSONL files written here."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from lminf_jax.errors import UserError
from lminf_jax.eval.longbench import (TASKS, classification, code_sim, count, normalize_answer, prompt_ids, qa_f1,
                                 read_jsonl, retrieval, rouge_l, score)


def test_qa_f1_normalisation():
  assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert normalize_answer("An apple, a pear; THE end.") == "apple pear end"
  assert normalize_answer("theatre another") == "theatre another"  # (whole words only)
  assert qa_f1("The Eiffel Tower.", "eiffel tower") == 1.0
  # pred {paris, france, capital} vs gold {paris}: P = 1/3, R = 1 -> F1 = 0.5
  assert qa_f1("Paris, the capital of France", "Paris") == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
  assert qa_f1("yes", "no") == 0.0
  assert qa_f1("", "no") == 0.0


def test_other_metrics_on_hand_written_cases():
  classes = ["Abbreviation", "Entity", "Description", "Human", "Location", "Numeric value"]
  assert classification("Location", "Location", classes) == 1.0
  assert classification("Location or Human", "Location", classes) == 0.5
  assert classification("Numeric", "Numeric value", classes) == 0.0
  assert retrieval("Paragraph 3", "Paragraph 3") == 1.0
  assert retrieval("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
  assert retrieval("none", "Paragraph 3") == 0.0
  assert count("There are 12 unique paragraphs, not 13.", "12") == 0.5
  assert code_sim("x = 1\n", "x = 1") == 1.0
  assert code_sim("# a comment\n```\nreturn a + b", "return a + b") == 1.0  # (lines with #, ` or // skipped)
  assert code_sim("", "return a") == 0.0
  assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0, abs=1e-6)
  assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
  assert rouge_l("", "the cat sat") == 0.0


def test_metric_template_and_first_line_per_task():
  """LongBench's dataset2metric, dataset2maxlen and the tasks whose prediction is cut to one line."""
  metric = {"narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
            "2wikimqa": "qa_f1", "musique": "qa_f1", "triviaqa": "qa_f1", "gov_report": "rouge_l",
            "qmsum": "rouge_l", "multi_news": "rouge_l", "samsum": "rouge_l", "trec": "classification",
            "passage_retrieval_en": "retrieval", "passage_count": "count", "lcc": "code_sim",
            "repobench-p": "code_sim"}
  new_tokens = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
  assert {name: t.metric for name, t in TASKS.items()} == metric
  assert {name: t.max_new_tokens for name, t in TASKS.items()} == new_tokens
  assert {name for name, t in TASKS.items() if t.first_line} == {"trec", "triviaqa", "samsum"}
  assert {name for name, t in TASKS.items() if not t.chat} == {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
  assert score(TASKS["trec"], "\nLocation\nHuman", ["Location"], ["Location", "Human"]) == 1.0
  assert score(TASKS["qasper"], "yes", ["no", "Yes."], None) == 1.0  # (the best of the answers)
  assert TASKS["qasper"].template.endswith("Question: {input}\n\nAnswer:")


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(smollm2_ckpt))


def _record(context: str, question: str = "What is the answer?", **overrides) -> dict:
  return dict(dict(input=question, context=context, answers=["forty two"], all_classes=None, length=len(context),
                   _id="x1"), **overrides)


def test_prompt_is_cut_in_the_middle(tokenizer):
  context = "START " + " ".join(f"w{i}" for i in range(3000)) + " END"
  full = tokenizer(TASKS["lcc"].template.format(context=context, input=""))["input_ids"]
  ids = prompt_ids(TASKS["lcc"], _record(context), tokenizer, 400)  # (lcc: no chat template)
  assert len(full) > 400 and abs(len(ids) - 400) <= 2
  text = tokenizer.decode(ids)
  assert text.startswith("Please complete the code given below.") and text.endswith("Next line of code:\n")
  assert tokenizer.decode(ids[:200]) == tokenizer.decode(full[:200])
  short = prompt_ids(TASKS["qasper"], _record("A short article."), tokenizer, 400)  # chat-wrapped, not cut
  assert "A short article." in tokenizer.decode(short) and tokenizer.decode(short).rstrip().endswith("assistant")


def test_a_missing_metric_package_is_refused(monkeypatch):
  import importlib.util

  from lminf_jax.eval.longbench import check_packages

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge" else real(name, *a))
  with pytest.raises(UserError, match="needs the rouge package"):
    check_packages(TASKS["gov_report"])
  check_packages(TASKS["qasper"])  # (qa F1 needs no package)


def test_jsonl_checks(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text(json.dumps(_record("c")) + "\n" + json.dumps({k: v for k, v in _record("c").items()
                                                               if k != "answers"}) + "\n")
  with pytest.raises(UserError, match="line 2: missing field 'answers'"):
    read_jsonl(path)
  path.write_text("{not json\n")
  with pytest.raises(UserError, match="line 1: not JSON"):
    read_jsonl(path)
  raw = dict(_record("c"), context="a\u2028b")  # (a raw U+2028 in a JSON string: still one line)
  path.write_text(json.dumps(raw, ensure_ascii=False) + "\n", encoding="utf-8")
  assert read_jsonl(path) == [raw]
  with pytest.raises(UserError, match="cannot read"):
    read_jsonl(tmp_path / "missing.jsonl")


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_cli_writes_predictions_scores_and_mean(smollm2_ckpt, tmp_path, capsys):
  data = _write(tmp_path / "qasper.jsonl", [
      _record("The answer to the question is forty two. " * 30, _id="a"),
      _record("Cats are mammals. " * 200, "Are cats mammals?", answers=["yes"], _id="b")])
  code, out, err = run_cli(capsys, "longbench", smollm2_ckpt, "--data", data, "--task", "qasper", "--max-length",
                           "512", "--attention", "lambda", "--n-local", "256", "--json", tmp_path / "lb.json")
  assert code == 0, err
  report = json.loads((tmp_path / "lb.json").read_text())
  assert [r["_id"] for r in report["results"]] == ["a", "b"]
  for r in report["results"]:
    assert r["score"] == max(qa_f1(r["prediction"], a) for a in r["answers"]) and r["prompt_tokens"] <= 512 + 40
  assert report["mean"]["lambda"] == pytest.approx(100 * sum(r["score"] for r in report["results"]) / 2)
  assert "qasper" in out


@pytest.mark.parametrize("records, args, message", [
    ([{"input": "q", "context": "c", "all_classes": None, "length": 1, "_id": "x"}], ("--task", "qasper"),
     "line 1: missing field 'answers'"),
    ([_record("c")], ("--task", "qasper_zh"), "unknown LongBench task 'qasper_zh'"),
    ([_record("a long context " * 60)], ("--task", "multifieldqa_en", "--max-length", "3"),
     "a max length of 3 tokens cannot hold the task's template and question"),
    ([_record("a long context " * 60)], ("--task", "qasper", "--max-length", "40"),
     "a max length of 40 tokens cannot hold the task's template and question"),
])
def test_cli_bad_input_is_one_line(smollm2_ckpt, tmp_path, capsys, records, args, message):
  data = _write(tmp_path / "d.jsonl", records)
  code, _, err = run_cli(capsys, "longbench", smollm2_ckpt, "--data", data, *args, "--json", tmp_path / "o.json")
  assert code == 1 and err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "o.json").exists()
