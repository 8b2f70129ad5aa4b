"""InfiniteBench (lminf_jax.eval.infinitebench): the generated retrieval tasks (exact lengths, needles and
answers where InfiniteBench's data script puts them, seeds), its scorers on hand-written predictions (the
expected values worked out from OpenBMB/InfiniteBench 88b3daa src/compute_scores.py, "cs.py:N"), prompts
and the middle cut of records in its JSONL schema, and `lminf infinitebench` end to end on SmolLM2."""

from __future__ import annotations

import json
import re

import pytest
from helpers import run_cli

from lminf_jax.errors import UserError
from lminf_jax.eval import EVAL_TASKS
from lminf_jax.eval import infinitebench_scores as S
from lminf_jax.eval.infinitebench import (TASKS, InfiniteBenchTask, generate_samples, prompt_ids, prompt_text,
                                          read_jsonl, read_records)
from lminf_jax.eval.infinitebench_synth import NOISE, depths

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(smollm2_ckpt))


# --- generated tasks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["passkey", "number_string", "kv_retrieval"])
@pytest.mark.parametrize("length", [333, 1500])
def test_generated_prompts_have_the_length_template_and_answer(tokenizer, task, length):
  samples = generate_samples(tokenizer, task, length, 3, seed=length)
  head, tail = TASKS[task].template.split("{context}")
  for s in samples:
    assert len(s.token_ids) == length
    text = tokenizer.decode(s.token_ids)
    assert text.startswith(head) and s.label in text
    assert abs(len(tokenizer(text)["input_ids"]) - length) <= 2  # (the text's own tokens, but at the cut)
    if task == "passkey":
      assert re.fullmatch(r"[0-9]{5}", s.label)
      assert text.endswith("\n\nWhat is the pass key?\n\nThe pass key is")
      assert tokenizer.decode(s.token_ids[s.needle_at:]).startswith(
          f"The pass key is {s.label}. Remember it. {s.label} is the pass key.\n")
    elif task == "number_string":
      # 5 digits, then 5 times a digit doubled in place (cd.py:32-38): each doubling adds an equal neighbour pair.
      assert re.fullmatch(r"[0-9]{10}", s.label) and sum(a == b for a, b in zip(s.label, s.label[1:])) >= 5
      assert text.endswith("\n\nWhat is the sequence of digits?\n\nThe sequence of digits is")
      assert tokenizer.decode(s.token_ids[s.needle_at:]).startswith(
          f"The sequence of digits is {s.label}. Remember it. {s.label} is the sequence of digits.\n")
    else:
      key = re.fullmatch(r'(?s).*\}\n\n\nKey: "([0-9a-f-]+)"\nThe value associated with the specified key is: ',
                         text).group(1)
      records = json.loads(text[len(head + "JSON data:\n"):text.rindex("}") + 1])  # (valid JSON, cut or not)
      assert records[key] == s.label and UUID4.match(key) and UUID4.match(s.label)
      assert sum(bool(UUID4.match(k)) and bool(UUID4.match(v)) for k, v in records.items()) >= len(records) - 1
      # the asked record is number int(depth * N) of the N (cd.py:95)
      assert list(records).index(key) == min(int(s.depth * len(records)), len(records) - 1)
      assert tokenizer.decode(s.token_ids[s.needle_at:]).lstrip(", {").startswith(f'"{key}": "{s.label}"')


def test_needle_lines_sit_at_the_depths_of_their_script(tokenizer):
  """j noise lines before the needle and N - j after (one of them cut), j / N the sample's depth."""
  needle = "The pass key is"
  for s in generate_samples(tokenizer, "passkey", 1200, 5, seed=3):
    context = tokenizer.decode(s.token_ids).split("\n\n")[1] + "\n"
    before, after = context.split(needle)
    j, rest = before.count("\n"), after.count("\n") - 1  # (lines after the needle's own)
    assert before.count(NOISE) >= j - 1 and abs(j / (j + rest) - s.depth) <= 1 / (j + rest)  # (one line cut)
  # their grid: lines j = 0, 90, ..., 5220 of 5220 (cd.py:57-64) and records int(i * 2500 / 500) (cd.py:95)
  assert [d * 5220 for d in depths("passkey", 59)] == list(range(0, 5221, 90))
  assert [int(d * 2500) for d in depths("kv_retrieval", 500)] == [int(i * 2500 / 500) for i in range(500)]


def test_a_tokenizer_that_adds_bos_and_marks_spaces(tmp_path):
  """A Llama-like tokenizer (BOS added, spaces as U+2581, byte fallback), trained here: the BOS counts in the
  length and the needle is found where stated."""
  from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
  raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  texts = [NOISE * 3, "The pass key is 0123456789. Remember it. What is the pass key?", 'JSON data:\n{"a-f": "b-9"}\n'
           '\n\nKey: "c"\nThe value associated with the specified key is: abcdef0123456789']
  raw.train_from_iterator(texts * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
  raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  for task, needle in (("passkey", "The pass key is {}"), ("kv_retrieval", '"{}')):
    for s in generate_samples(tokenizer, task, 700, 3, seed=0):
      assert len(s.token_ids) == 700 and s.token_ids[0] == tokenizer.bos_token_id
      text = tokenizer.decode(s.token_ids[s.needle_at:], skip_special_tokens=True)
      key = s.label if task == "passkey" else re.search(r'Key: "([0-9a-f-]+)"', text).group(1)
      assert text.lstrip("\n ,{").startswith(needle.format(key)) and s.label in text  # (its first token may
      # begin at the newline or separator before it)


def test_generated_samples_follow_the_seed(tokenizer):
  a, b = (generate_samples(tokenizer, "kv_retrieval", 600, 2, seed=7) for _ in range(2))
  c = generate_samples(tokenizer, "kv_retrieval", 600, 2, seed=8)
  assert [s.token_ids for s in a] == [s.token_ids for s in b] and [s.label for s in a] == [s.label for s in b]
  assert a[0].token_ids != c[0].token_ids and a[0].label != c[0].label


def test_a_length_below_the_template_is_refused(tokenizer):
  with pytest.raises(UserError, match="InfiniteBench length 40 is too short for number_string"):
    generate_samples(tokenizer, "number_string", 40, 1, seed=0)


# --- scorers (hand-written predictions; the expected values follow their code) ------------------------------
def test_passkey_number_string_and_kv_scores():
  # cs.py:122-129, 146-155: the first run of digits, compared as a string
  assert S.score("passkey", " 71432.", "71432") == 1.0
  assert S.score("passkey", "The key is 01234", ["01234"]) == 1.0  # (leading zero kept)
  assert S.score("passkey", "-71432", "71432") == 1.0  # (a minus is not a digit)
  assert S.score("passkey", "12 71432", "71432") == 0.0
  assert S.score("passkey", "7143", "71432") == 0.0 and S.score("passkey", "none", "71432") == 0.0
  assert S.score("number_string", "30000\nThe grass is green.", "3000077442") == 0.0
  assert S.score("number_string", "3000077442.", "3000077442") == 1.0
  # cs.py:139-143: a word after \n : " ' . , ? ! { } became spaces
  value = "060f3306-5ad1-42a9-a8de-f2a118b33744"
  assert S.score("kv_retrieval", f'{value}\n\n\nKey: "798c2306-5', value) == 1.0
  assert S.score("kv_retrieval", f'The value is "{value}".', [value]) == 1.0
  assert S.score("kv_retrieval", f"({value})", value) == 0.0  # (parentheses stay)
  assert S.score("kv_retrieval", value[:-1], value) == 0.0


def test_code_scores():
  # cs.py:158-174: the last word (after \n . ` ' " : became spaces), read by int()
  assert S.score("code_run", "The return value is: 4.", 4) == 1.0
  assert S.score("code_run", "value is `-12`", [-12]) == 1.0
  assert S.score("code_run", "4 is the value", 4) == 0.0
  assert S.score("code_run", "", 4) == 0.0
  assert S.score("code_run", "so 4", "4") == 1.0  # (a label written as a string: read as the number)
  # cs.py:177-212
  label = ["repack_carchive", "B"]
  assert S.score("code_debug", "B. repack_carchive", label) == 1.0
  assert S.score("code_debug", "\n\n    A\n    B\n    C\n    D\n", label) == 0.0
  assert S.score("code_debug", "The answer is: B", label) == 1.0
  assert S.score("code_debug", "The correct option is: repack_carchive", label) == 1.0  # ("is:" comes first)
  assert S.score("code_debug", "answer: `B`", label) == 1.0
  assert S.score("code_debug", "The answer is:", label) == 0.0  # (nothing after the prefix)
  assert S.score("code_debug", "The answer: C, it is: B", label) == 1.0  # ("is:" before "answer:")
  assert S.score("code_debug", "Option B", label) == 0.0


def test_choice_and_dialogue_scores():
  label = ["Snowfield", "C"]
  # cs.py:247-285
  assert S.score("longbook_choice_eng", ":\n\nDear reader,\n\nThe answer to your question is C. Snowfield.",
                 label) == 1.0  # (no prefix: the first word that is in "ABCD")
  assert S.score("longbook_choice_eng", "Snowfield", label) == 1.0
  assert S.score("longbook_choice_eng", "B) C", label) == 0.0  # (the first character)
  assert S.score("longbook_choice_eng", "So the answer is C", label) == 1.0
  assert S.score("longbook_choice_eng", "So the answer is", label) == 0.0
  assert S.score("longbook_choice_eng", "the BC one, C", label) == 0.0  # ("BC" is in "ABCD")
  assert S.score("longbook_choice_eng", "", label) == 0.0
  # cs.py:237-244: the first name, among the upper-cased words
  names = ["ACE", "ACE ROTHSTEIN"]
  assert S.score("longdialogue_qa_eng", "GREEN.\n\n\nINT. ACE'S SAN DIEGO", names) == 1.0
  assert S.score("longdialogue_qa_eng", "ace", names) == 1.0
  assert S.score("longdialogue_qa_eng", "to be 'Philip Green'.", ["GAGGI", "Remo"]) == 0.0
  assert S.score("longdialogue_qa_eng", "Remo", ["Remo"]) == 0.0  # (the label is not upper-cased)


def test_math_scores():
  # cs.py:215-234
  assert S.score("math_find", "88\n\nThe smallest number of the list is: 1", [88]) == 1.0
  assert S.score("math_find", "The median is 49.5", 49.5) == 1.0
  assert S.score("math_find", "49", 49.5) == 0.0
  assert S.score("math_find", "3.5", 3) == 0.0  # (theirs stops on int("3.5"))
  assert S.score("math_find", "none", 3) == 0.0 and S.score("math_find", "about 7", ["7"]) == 1.0
  # cs.py:306-330: the values right in order, up to the first wrong one, over the values
  assert S.score("math_calc", "[1, 4, 9]", [[1, 4, 8]]) == pytest.approx(2 / 3)
  assert S.score("math_calc", "1, 4, 8, 10", [1, 4, 8]) == 1.0
  assert S.score("math_calc", "-1, 4", [1, 4]) == 1.0  # (digits only)
  assert S.score("math_calc", "", [1, 4, 8]) == 0.0 and S.score("math_calc", "2, 4, 8", [1, 4, 8]) == 0.0


def test_qa_scores():
  # cs.py:63-79: {cael, bronwyn, dies, in, war} vs {fighting, in, world, war, 1}: 2 common, P = R = 2/5
  assert S.score("longbook_qa_eng", "Cael Bronwyn dies in a war.", ["fighting in world war 1"]) == pytest.approx(0.4)
  assert S.score("longbook_qa_eng", "stockings", ["a sweater", "Stockings!"]) == 1.0
  # cs.py:82-101: characters, punctuation and spaces dropped: 程紫洁薛鹊 vs 田立帆商老太薛鹊, 2 common
  assert S.score("longbook_qa_chn", "程紫洁， 薛鹊", ["田立帆，商老太，薛鹊"]) == pytest.approx(2 * (2 / 5) * (2 / 8) / (
      2 / 5 + 2 / 8))
  assert S.score("longbook_qa_chn", "", ["薛鹊"]) == 0.0


def test_rouge_lsum():
  """Summary-level LCS (Lin 2004, 3.2): r = w1..w5, c = "w1 w2 w6 w7 w8" / "w1 w3 w8 w9 w5": the union LCS
  w1 w2 w3 w5, so R = 4/5, P = 4/10."""
  f = 2 * 0.8 * 0.4 / 1.2
  assert S.rouge_lsum("w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5", "w1 w2 w3 w4 w5") == pytest.approx(f)
  assert S.rouge_lsum("The cat, sat.", "the cat sat") == pytest.approx(1.0)  # (lower case, a-z 0-9 only)
  assert S.rouge_lsum("a b c d", "a c b d") == pytest.approx(0.75)  # (one LCS of 3)
  # Each sentence's LCS read back from the end takes the last "a": the union is one token, P = R = 1/2.
  assert S.rouge_lsum("a\na", "a a") == pytest.approx(0.5)
  assert S.rouge_lsum("", "a b") == 0.0 and S.rouge_lsum("!!", "a b") == 0.0
  assert S.score("longbook_sum_eng", "a b c d", ["x y", "a c b d"]) == pytest.approx(0.75)  # (the best reference)


# --- read records --------------------------------------------------------------------------------------------
def _records() -> dict[str, list[dict]]:
  """Records in InfiniteBench's JSONL schema (id, context, input, answer, options)."""
  code = "def func_1(x):\n    return x + 2\n\n" * 3
  return {
      "code_run": [dict(id=0, context=code, input="Please give me the exact number of the return value of func_1(-3). "
                        "Your response should end with the sentence 'The return value is:'.", answer=[-1],
                        options=[])],
      "code_debug": [dict(id=0, context=code, input="", answer="func_1", options=["func_0", "func_1", "f", "g"])],
      "longbook_choice_eng": [dict(id=3, context="A long book. " * 300, input="Where?",
                                   answer=["Snowfield"], options=["Town", "Sea", "Snowfield", "Moon"])],
      "math_find": [dict(id=0, context="[1, 2, 3]", input="You should answer with only one number, no other words. "
                         "The largest number of the list is: ", answer=[3], options=[])],
  }


def test_prompts_fill_their_templates():
  """create_prompt (src/eval_utils.py:102-226) with yarn_mistral_templates (src/prompt.py:17-30)."""
  r = _records()
  assert prompt_text("code_run", r["code_run"][0]) == (
      "There is a function called func_1 in the following Python code.\n\n" + r["code_run"][0]["context"] +
      "\n\nPlease compute the exact value of func_1(-3). The value of func_1(-3) is")
  assert prompt_text("math_find", r["math_find"][0]) == (  # ("The largest number of", lower case, " of" cut)
      "What is the largest number in the following list?\n\n[1, 2, 3]\n\n" + r["math_find"][0]["input"])
  assert prompt_text("longbook_choice_eng", r["longbook_choice_eng"][0]).endswith(
      "Question: Where?\nA. Town\nB. Sea\nC. Snowfield\nD. Moon\n\nThe letter of the correct answer is")
  assert S.label("code_debug", r["code_debug"][0], "x") == ["func_1", "B"]
  assert S.label("longbook_choice_eng", r["longbook_choice_eng"][0], "x") == ["Snowfield", "C"]
  assert {name: t.max_new_tokens for name, t in TASKS.items()} == {  # src/eval_utils.py:36-49
      "passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200, "longbook_choice_eng": 40,
      "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40, "math_find": 3, "math_calc": 30000,
      "code_run": 5, "code_debug": 5}


def test_a_long_prompt_is_cut_in_its_middle(tokenizer):
  record = _records()["longbook_choice_eng"][0]
  full = tokenizer(prompt_text("longbook_choice_eng", record))["input_ids"]
  ids = prompt_ids(tokenizer, "longbook_choice_eng", record, 301)
  # (their cut, done here: the first and last 301 // 2 tokens, decoded as one text, encoded again)
  assert len(full) > 301 and ids == tokenizer(tokenizer.decode(full[:150] + full[-150:]))["input_ids"]
  text = tokenizer.decode(ids)
  assert text.startswith("Read the book and answer the question.") and text.endswith("correct answer is")
  assert abs(len(ids) - 300) <= 2
  assert prompt_ids(tokenizer, "longbook_choice_eng", record, 10**6) == full
  with pytest.raises(UserError, match="length 20 is too short for longbook_choice_eng"):
    prompt_ids(tokenizer, "longbook_choice_eng", record, 20)


def _write(directory, records: dict[str, list]) -> None:
  directory.mkdir(exist_ok=True)
  for task, rows in records.items():
    (directory / f"{task}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_reader(tmp_path):
  _write(tmp_path, _records())
  records = read_records(["code_run", "longbook_choice_eng"], tmp_path)
  assert records == {t: tuple(_records()[t]) for t in ("code_run", "longbook_choice_eng")}
  (tmp_path / "x.jsonl").write_text(json.dumps(_records()["code_run"][0]) + "\n\n" + json.dumps({"context": ""}) + "\n")
  with pytest.raises(UserError, match="line 3: missing field 'input', 'answer'"):
    read_jsonl(tmp_path / "x.jsonl", "code_run")
  assert len(read_jsonl(tmp_path / "x.jsonl", "code_run", limit=1)) == 1
  for record, message in (("{not json", "line 1: not JSON"), (dict(_records()["code_debug"][0], answer="h"),
                                                             "the answer 'h' is not one of the options"),
                          (dict(_records()["code_debug"][0], options=["a"]), "'options' must be a list of 4")):
    _write(tmp_path, {"code_debug": [record]})
    with pytest.raises(UserError, match=message):
      read_jsonl(tmp_path / "code_debug.jsonl", "code_debug")
  with pytest.raises(UserError, match="no InfiniteBench data for math_calc"):
    read_records(["math_calc"], tmp_path)
  raw = dict(_records()["math_find"][0], context="[1,\u2028 2]")  # (a raw U+2028 in a JSON string: still one line)
  (tmp_path / "math_find.jsonl").write_text(json.dumps(raw, ensure_ascii=False) + "\n", encoding="utf-8")
  assert read_jsonl(tmp_path / "math_find.jsonl", "math_find") == [raw]


def test_task_is_registered_and_refuses_unread_tasks(tokenizer):
  assert EVAL_TASKS["infinitebench"] is InfiniteBenchTask
  with pytest.raises(UserError, match="longbook_qa_eng is read from InfiniteBench's JSONL files"):
    InfiniteBenchTask(("passkey", "longbook_qa_eng")).samples(tokenizer)


# --- the command ------------------------------------------------------------------------------------------
@pytest.mark.slow  # (the command's own code runs in CI through the data-dir test below; this adds SmolLM2's generate)
def test_cli_generated_tasks(smollm2_ckpt, tmp_path, capsys):
  code, out, err = run_cli(capsys, "infinitebench", smollm2_ckpt, "--lengths", "300", "--tasks",
                           "passkey,kv_retrieval", "--samples", "2", "--attention", "lambda", "--n-local", "128",
                           "--batch", "2", "--json", tmp_path / "ib.json", "--plot", tmp_path / "ib.png")
  assert code == 0, err
  report = json.loads((tmp_path / "ib.json").read_text())
  rows = [(r["method"], r["task"], r["length"], r["prompt_tokens"], r["depth"]) for r in report["results"]]
  assert rows == [("lambda", t, 300, 300, d) for t, ds in (("passkey", (0, 1)), ("kv_retrieval", (0, 0.5)))
                  for d in ds]
  for r in report["results"]:
    words = re.sub(r"[\n:\"'.,?!{}]", " ", r["prediction"]).split()
    expected = (re.findall("[0-9]+", r["prediction"]) or [""])[0] == r["label"] if r["task"] == "passkey" else \
        r["label"] in words
    assert r["score"] == float(expected)
  assert (tmp_path / "ib.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "passkey (R.PK)" in out and "kv_retrieval (R.KV)" in out and "mean" in out


def test_cli_reads_the_data_dir(smollm2_ckpt, tmp_path, capsys, monkeypatch):
  """`--data-dir` reads every task named from it, `--samples` records each, and hands them to the runner (replaced
  here: the generation is the generated tasks' test's)."""
  import lminf_jax.cli.eval as cli_eval

  seen = {}
  monkeypatch.setattr(cli_eval, "run", lambda task, params, config, tokenizer, *a: seen.update(
      task=task, samples=task.samples(tokenizer)))
  _write(tmp_path / "data", dict(_records(), code_run=_records()["code_run"] * 3))
  code, _, err = run_cli(capsys, "infinitebench", smollm2_ckpt, "--data-dir", tmp_path / "data", "--lengths", "200,90",
                         "--tasks", "longbook_choice_eng,code_run", "--samples", "2", "--attention", "lambda")
  assert code == 0, err
  task, samples = seen["task"], seen["samples"]
  assert task.data_dir == str(tmp_path / "data") and task.samples_per_cell == 2
  assert {k: len(v) for k, v in samples.items()} == {("longbook_choice_eng", 200): 1, ("longbook_choice_eng", 90): 1,
                                                     ("code_run", 200): 2, ("code_run", 90): 2}
  choice = samples["longbook_choice_eng", 200][0]
  assert (choice.id, choice.label, choice.depth) == (3, ["Snowfield", "C"], None)
  assert abs(len(choice.token_ids) - 200) <= 2 and abs(len(samples["longbook_choice_eng", 90][0].token_ids) - 90) <= 2
  assert samples["code_run", 200][1].label == [-1] and task.score("The value is -1", samples["code_run", 200][1]) == 1.0


@pytest.mark.slow
def test_cli_read_tasks(smollm2_ckpt, tmp_path, capsys):
  _write(tmp_path / "data", _records())
  code, out, err = run_cli(capsys, "infinitebench", smollm2_ckpt, "--data-dir", tmp_path / "data", "--lengths", "200",
                           "--tasks", "longbook_choice_eng,code_run", "--attention", "lambda", "--n-local", "128",
                           "--json", tmp_path / "ib.json")
  assert code == 0, err
  report = json.loads((tmp_path / "ib.json").read_text())
  assert report["read"] == ["code_run", "longbook_choice_eng"] and report["data_dir"] == str(tmp_path / "data")
  choice, run = report["results"]
  assert (choice["task"], choice["id"], choice["label"], run["label"]) == ("longbook_choice_eng", 3, ["Snowfield", "C"],
                                                                         [-1])
  assert abs(choice["prompt_tokens"] - 200) <= 2 and run["prompt_tokens"] < 200  # (cut; short enough as it is)
  assert choice["score"] == S.score("longbook_choice_eng", choice["prediction"], ["Snowfield", "C"])
  assert run["score"] == S.score("code_run", run["prediction"], [-1])


@pytest.mark.parametrize("args, message", [
    (("--tasks", "passkey,longbook_qa"), "unknown InfiniteBench task longbook_qa"),
    (("--tasks", "passkey,longbook_qa_eng"), "longbook_qa_eng is read from InfiniteBench's JSONL files"),
    (("--tasks", "code_run,math_calc", "--data-dir", "{data}"), "no InfiniteBench data for math_calc"),
    (("--tasks", "code_run", "--data-dir", "{tmp}/none"), "no InfiniteBench data directory"),
    (("--tasks", "passkey", "--lengths", "20"), "InfiniteBench length 20 is too short for passkey"),
    (("--tasks", "code_debug", "--data-dir", "{bad}"), "code_debug.jsonl line 1: not JSON"),
])
def test_cli_bad_input_is_one_line(smollm2_ckpt, tmp_path, capsys, args, message):
  _write(tmp_path / "data", _records())
  _write(tmp_path / "bad", {"code_debug": ["{"]})
  args = [a.format(data=tmp_path / "data", bad=tmp_path / "bad", tmp=tmp_path) for a in args]
  code, _, err = run_cli(capsys, "infinitebench", smollm2_ckpt, "--samples", "1", "--attention", "dense", "--json",
                         tmp_path / "o.json", *args)
  assert code == 1 and err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "o.json").exists()
