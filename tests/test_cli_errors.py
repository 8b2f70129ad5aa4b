"""Every bad input gets exit code != 0 and exactly one line `lminf: error: ...` naming the problem.

Most cases are rows of one table, CASES: (setup, argv, exit code, substrings of the error line).
A setup edits a copy of a shared tiny model (or writes a file, or patches something) and returns
placeholders for argv: {hf} (a tiny HF model dir, no tokenizer), {tok} (the same with a word-level
tokenizer), {ckpt} (that converted), {tokens} (a .npy of token ids), {tmp} (this case's dir,
where outputs go) and {src} (what the setup made). Cases that need more than a row follow it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

from lminf_jax.errors import UserError
from lminf_jax.eval.passkey import FILLER, NEEDLE, PREFIX, QUESTION

DELETE = object()  # a config value that removes the key


def _assert_one_line_error(result, *needles: str, code: int = 1):
  exit_code, out, err = result
  assert exit_code == code, (exit_code, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("lminf: error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def _word_tokenizer(model_dir: Path) -> None:
  """Saves a word-level tokenizer (ids < 97, the tiny vocab) that knows the passkey template's words."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = sorted(set(re.findall(r"\w+|[^\w\s]", PREFIX + FILLER + NEEDLE + QUESTION)))
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
  """The read-only inputs of every case: {hf}, {tok}, {ckpt}, {tokens}."""
  from lminf_jax.loading import convert_checkpoint

  root = tmp_path_factory.mktemp("shared")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")
  shutil.copytree(root / "hf", root / "tok")
  _word_tokenizer(root / "tok")
  np.save(root / "tokens.npy", np.arange(20) % 97)
  return dict(hf=root / "hf", tok=root / "tok", ckpt=convert_checkpoint(root / "tok", root / "ckpt"), tokens=root / "tokens.npy")


@dataclasses.dataclass
class Env:
  shared: dict[str, Path]
  tmp: Path
  monkeypatch: pytest.MonkeyPatch

  def copy(self, name: str) -> Path:
    return Path(shutil.copytree(self.shared[name], self.tmp / f"{name}_copy"))


@pytest.fixture
def env(shared, tmp_path, monkeypatch) -> Env:
  return Env(shared, tmp_path, monkeypatch)


# --- setups: Env -> placeholders ----------------------------------------------------------------

def nothing(env: Env) -> dict:
  return {}


def _edit(path: Path, changes: dict, key: str | None = None) -> None:
  data = json.loads(path.read_text())
  fields = data[key] if key else data
  for name, value in changes.items():
    fields.pop(name) if value is DELETE else fields.__setitem__(name, value)
  path.write_text(json.dumps(data))


def hf_config(**changes):
  def setup(env: Env) -> dict:
    src = env.copy("hf")
    _edit(src / "config.json", changes)
    return dict(src=src)
  return setup


def ckpt_config(**changes):
  def setup(env: Env) -> dict:
    src = env.copy("ckpt")
    _edit(src / "config.json", changes, key="lminf_jax")
    return dict(src=src)
  return setup


def ckpt_and_longbench_data(**changes):
  """A copy of {ckpt} with `changes` in its config, and a one-record LongBench JSONL as {data}."""
  def setup(env: Env) -> dict:
    data = env.tmp / "data.jsonl"
    data.write_text(json.dumps(dict(input="the question", context="the sky is blue " * 50, answers=["blue"],
                                    all_classes=None, length=200, _id="x")) + "\n")
    return dict(ckpt_config(**changes)(env), data=data)
  return setup


def file_in(model: str, name: str, data: bytes, remove: tuple[str, ...] = ()):
  """A copy of `model` with file `name` holding `data` (and the files `remove` removed)."""
  def setup(env: Env) -> dict:
    src = env.copy(model)
    for other in remove:
      (src / other).unlink()
    (src / name).write_bytes(data)
    return dict(src=src)
  return setup


def torch_bin(value_of_state):
  """The HF model with pytorch_model.bin = value_of_state(its state dict) instead of safetensors."""
  def setup(env: Env) -> dict:
    import torch
    from safetensors.torch import load_file

    src = env.copy("hf")
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(value_of_state(state), src / "pytorch_model.bin")
    return dict(src=src)
  return setup


def without_torch(env: Env) -> dict:
  placeholders = torch_bin(lambda state: state)(env)
  env.monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  return placeholders


def index_with(weight_map):
  def setup(env: Env) -> dict:
    src = env.copy("hf")
    (src / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    return dict(src=src)
  return setup


def tokens_file(save):
  def setup(env: Env) -> dict:
    path = env.tmp / "t.npy"
    save(path)
    return dict(tokens=path)
  return setup


def gguf_with(**metadata):
  """A tiny synthetic llama GGUF (only the embedding tensor) with the given llama.* metadata."""
  def setup(env: Env) -> dict:
    import gguf

    path = env.tmp / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    fields = dict(block_count=2, embedding_length=64, feed_forward_length=80, head_count=8, head_count_kv=2,
                  context_length=256, vocab_size=97, layer_norm_rms_eps=1e-5) | metadata
    for name, value in fields.items():
      getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((97, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(src=path)
  return setup


def device_memory_of(nbytes: int):
  """Pretends the device has `nbytes` of memory (the cache checks then do not depend on the machine)."""
  def setup(env: Env) -> dict:
    env.monkeypatch.setattr("lminf_jax.cache.device_memory", lambda: ("the test device", nbytes))
    return {}
  return setup


# --- argv ---------------------------------------------------------------------------------------

CONVERT = ("convert", "{src}", "{tmp}/out")


def nll(model: str = "{hf}", *flags: str) -> tuple[str, ...]:
  return ("nll", model, "--tokens-file", "{tokens}", "--out", "{tmp}/out.npy") + flags


def generate(*flags: str, model: str = "{tok}") -> tuple[str, ...]:
  return ("generate", model, "--prompt", "The sky is blue.") + flags


def row(setup, argv, needles, code=1, id=None):
  return pytest.param(setup, argv, code, needles, id=id)


ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)
FINETUNE = ("finetune", "{hf}", "--tokens-file", "{tokens}", "--seq-len", "8", "--steps", "1", "--lr", "1e-3",
            "--out", "{tmp}/out")
GiB = 2**30

CASES = [
    # paths and formats
    row(nothing, ("convert", "{tmp}/nope", "{tmp}/out"), ["no such file", "nope"], id="missing path"),
    row(lambda env: dict(src=env.tmp), CONVERT, ["not a model dir"], id="not a model dir"),
    row(file_in("hf", "notes.txt", b"hello"), ("convert", "{src}/notes.txt", "{tmp}/out"), ["not a .gguf"],
        id="not a gguf file"),
    # A) config.json of an HF dir
    row(hf_config(model_type="gpt2"), CONVERT, ["unsupported model_type", "gpt2"], id="model_type"),
    row(hf_config(intermediate_size=81), CONVERT,
        ["tensor model.layers.0.mlp.", "has shape (", "80", "expected (", "81"], id="tensor shape mismatch"),
    row(hf_config(num_attention_heads=0), CONVERT, ["config.json", "num_attention_heads", "got 0"], id="zero heads"),
    row(hf_config(hidden_size="64"), CONVERT, ["hidden_size", "'64'"], id="string hidden_size"),
    row(hf_config(rms_norm_eps="1e-5"), CONVERT, ["rms_norm_eps", "'1e-5'"], id="string rms_norm_eps"),
    row(hf_config(num_hidden_layers="2"), CONVERT, ["num_hidden_layers", "'2'"], id="string num_hidden_layers"),
    row(hf_config(num_hidden_layers=-2), CONVERT, ["num_hidden_layers", "-2"], id="negative layers"),
    row(hf_config(num_hidden_layers=2.5), CONVERT, ["num_hidden_layers", "2.5"], id="fractional layers"),
    row(hf_config(vocab_size=DELETE), CONVERT, ["lacks vocab_size"], id="missing vocab_size"),
    row(hf_config(vocab_size=10**12), CONVERT, ["vocab_size", str(10**12), str(2**31 - 1)], id="huge vocab_size"),
    row(hf_config(vocab_size=2**30, hidden_size=2**14), CONVERT, ["parameters", "GiB", "limit of 1e+12"],
        id="over a trillion params"),
    row(hf_config(vocab_size=2**31 - 1), CONVERT, ["holding the params", "GiB", "memory of this machine"],
        id="params over the memory"),
    row(hf_config(max_position_embeddings=0), CONVERT, ["max_position_embeddings", "got 0"], id="zero positions"),
    row(hf_config(max_position_embeddings=-5), CONVERT, ["max_position_embeddings", "-5"], id="negative positions"),
    row(hf_config(rope_scaling=ROPE, rope_parameters=dict(ROPE, factor=4.0)), CONVERT,
        ["rope_scaling", "rope_parameters", "factor", "8.0", "4.0"], id="rope factor conflict"),
    row(hf_config(rope_scaling=dict(type="linear", factor=2.0), rope_parameters=dict(rope_type="default")), CONVERT,
        ["rope_scaling", "rope_parameters", "rope_type", "linear", "default"], id="rope type conflict"),
    row(hf_config(rope_parameters=dict(rope_type="proportional", factor=4.0)), CONVERT,
        ["unsupported rope scaling 'proportional'"], id="llama proportional"),
    row(hf_config(model_type="phi3", partial_rotary_factor=0.9), CONVERT,
        ["partial_rotary_factor", "even number of the 8 head dims", "0.9"], id="phi3 odd rotary dims"),
    row(hf_config(model_type="phi3", partial_rotary_factor=1.5), CONVERT, ["partial_rotary_factor", "1.5"],
        id="phi3 rotary factor above 1"),
    row(hf_config(model_type="phi3", original_max_position_embeddings=32,
                  rope_parameters=dict(rope_type="longrope", short_factor=[1.0], long_factor=[1.0] * 4)), CONVERT,
        ["longrope short_factor must hold 4 positive numbers", "got 1"], id="phi3 longrope factor count"),
    row(hf_config(model_type="phi3",
                  rope_parameters=dict(rope_type="su", short_factor=[1.0] * 4, long_factor=[1.0] * 4)), CONVERT, ["bad rope scaling", "original_max_position_embeddings"], id="phi3 longrope without original length"),
    row(hf_config(model_type="qwen3", use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"]),
        CONVERT, ["layer_types must list 2", "sliding_attention"], id="qwen3 layer_types too short"),
    row(hf_config(model_type="gemma2", hidden_act=DELETE, layer_types=["sliding_attention", "chunked_attention"]),
        CONVERT, ["layer_types", "chunked_attention"], id="gemma2 unknown layer type"),
    row(hf_config(model_type="gemma2", hidden_activation="gelu"), CONVERT, ["unsupported hidden_act 'gelu'", "gemma2"],
        id="gemma2 exact gelu"),
    row(hf_config(model_type="gemma3_text", hidden_act=DELETE, use_bidirectional_attention=True), CONVERT,
        ["use_bidirectional_attention"], id="gemma3 bidirectional"),
    row(hf_config(model_type="gemma3_text", hidden_act=DELETE, sliding_window=8,
                  rope_parameters={"sliding_attention": dict(rope_type="linear", factor=2.0)}), CONVERT,
        ["'linear' on the sliding layers"], id="gemma3 scaled local rope"),
    *[row(hf_config(model_type=kind, hidden_act=DELETE, sliding_window=window, **types), CONVERT,
          ["layer_types has sliding_attention layers", f"sliding_window must be a positive integer, got {window}"],
          id=f"{kind} sliding_window {window} {'with' if types else 'without'} layer_types")
      for kind in ("gemma2", "gemma3_text") for window in (0, None)
      for types in ({}, {"layer_types": ["full_attention", "sliding_attention"]})],
    row(file_in("hf", "config.json", b"[1, 2]"), CONVERT, ["JSON object", "list"], id="config is a list"),
    row(file_in("hf", "generation_config.json", b'{"eos_token_id": [2, "x"]}'), CONVERT,
        ["generation_config.json", "eos_token_id must be a token id"], id="generation config eos not ids"),
    row(hf_config(eos_token_id=-1), CONVERT, ["config.json", "eos_token_id must be a token id"], id="eos negative"),
    row(file_in("hf", "config.json", b'{"model_type": "llama\xff"}'), CONVERT, ["config.json", "not UTF-8"],
        id="config not UTF-8"),
    # A) config.json of a checkpoint dir
    row(ckpt_config(num_layers=-2), nll("{src}"), ["config.json", "num_layers", "-2"], id="ckpt negative layers"),
    row(ckpt_config(num_heads=0), nll("{src}"), ["num_heads", "got 0"], id="ckpt zero heads"),
    row(ckpt_config(hidden_size="64"), nll("{src}"), ["hidden_size", "'64'"], id="ckpt string hidden_size"),
    row(ckpt_config(vocab_size=DELETE), nll("{src}"), ["lacks vocab_size"], id="ckpt missing vocab_size"),
    row(ckpt_config(eos_token_ids=[2, "x"]), nll("{src}"), ["config.json", "eos_token_id must be a token id"],
        id="ckpt eos not ids"),
    row(ckpt_config(vocab_size=10**12), nll("{src}"), ["vocab_size", str(2**31 - 1)], id="ckpt huge vocab_size"),
    row(ckpt_config(max_position_embeddings=0), nll("{src}"), ["max_position_embeddings"], id="ckpt zero positions"),
    row(file_in("ckpt", "config.json", b"[]"), nll("{src}"), ["JSON object", "list"], id="ckpt config is a list"),
    row(file_in("ckpt", "config.json", b'{"lminf_jax": "\xfe"}'), nll("{src}"), ["not UTF-8"],
        id="ckpt config not UTF-8"),
    # B) weight files
    row(file_in("hf", "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), CONVERT, ["truncated or corrupt"],
        id="truncated safetensors"),
    row(index_with(["model.safetensors"]), CONVERT, ["weight_map", "list"], id="index weight_map a list"),
    row(index_with({"model.norm.weight": 3}), CONVERT, ["weight_map", "dict"], id="index weight_map to an int"),
    row(file_in("tok", "tokenizer.json", b'{"version": "1.0", "model": '), CONVERT,
        ["cannot read the tokenizer of", "tok_copy"], id="corrupt tokenizer.json in an HF dir"),
    row(file_in("ckpt", "tokenizer.json", b"\x00 not json"), nll("{src}"),
        ["cannot read the tokenizer of", "ckpt_copy"], id="corrupt tokenizer.json in a checkpoint"),
    row(file_in("hf", "pytorch_model.bin", b"\x80\x02not a pickle" * 100, remove=("model.safetensors",)), CONVERT,
        ["truncated or corrupt"], id="corrupt torch bin"),
    row(torch_bin(lambda state: list(state.values())), CONVERT, ["holds a list", "not a dict of tensors"],
        id="torch bin holding a list"),
    row(torch_bin(lambda state: dict(state, step=3)), CONVERT, ["'step'", "of type int", "not a tensor"],
        id="torch bin holding an int"),
    row(without_torch, CONVERT, ["pytorch_model.bin", "pip install torch"], id="torch bin without torch"),
    row(gguf_with(head_count=0), CONVERT, ["tiny.gguf", "num_attention_heads", "got 0"], id="gguf zero heads"),
    row(gguf_with(block_count=-1 % 2**32), CONVERT, ["tiny.gguf", "num_hidden_layers"], id="gguf 2**32-1 layers"),
    # C) token files
    row(nothing, nll("{hf}", "--attention", "sparse"), ["unknown attention method", "sparse"], id="attention"),
    row(tokens_file(lambda p: None), nll(), ["error: no such file", "t.npy"], id="missing tokens file"),
    row(tokens_file(lambda p: np.save(p, np.zeros((2, 3), np.int64))), nll(), ["1-D"], id="2-D tokens"),
    row(tokens_file(lambda p: np.save(p, np.array([1, 2, 5000]))), nll(), ["[0, 97)"], id="token id over vocab"),
    row(tokens_file(lambda p: np.save(p, np.array([1]))), nll(), ["at least 2 tokens"], id="one token"),
    row(tokens_file(lambda p: p.write_bytes(b"junk")), nll(), ["not a valid .npy"], id="junk tokens file"),
    row(tokens_file(lambda p: np.savez(p.with_suffix(""), ids=np.arange(5)) or p.with_suffix(".npz").rename(p)), nll(),
        ["npz", "1-D .npy"], id="npz tokens file"),
    # D) flags
    *[row(nothing, nll("{hf}", flag, value), [flag], code=2, id=f"{flag} {value}")
      for flag in ("--max-tokens", "--chunk") for value in ("0", "-3", "ten")],
    row(nothing, nll("{hf}", "--distributed"), ["multi-host", "--coordinator", "--num-processes", "--process-id"],
        id="distributed off Cloud TPU"),
    row(nothing, generate("--max-new-tokens", str(10**12)), ["--max-new-tokens", str(2**31 - 1)], code=2,
        id="max-new-tokens 10**12"),
    row(nothing, generate("--max-new-tokens", str(2**31 - 1)), ["int32 positions", str(2**31 - 1)],
        id="prompt + new tokens over int32"),
    row(device_memory_of(GiB), generate("--max-new-tokens", str(10**9)),
        ["dense cache for 1000000", "GiB", "1.0 GiB", "test device"], id="max-new-tokens over memory"),
    row(nothing, generate("--n-local", str(10**10)), ["--n-local", str(2**31 - 1)], code=2, id="n-local 10**10"),
    *[row(device_memory_of(GiB), argv + ("--attention", "lambda", "--n-local", str(2 * 10**9)),
          ["lambda attention over a window of 2000000", "GiB"], id=f"{argv[0]} lambda window over memory")
      for argv in (generate(), nll(), ("ppl", "{tok}"), ("passkey", "{tok}"), FINETUNE)],
    *[row(nothing, nll("{hf}", "--attention", "selfextend", flag, "0"), [flag], code=2, id=f"selfextend {flag} 0")
      for flag in ("--group-size", "--window-size")],
    row(nothing, nll("{hf}", "--attention", "dca", "--chunk-size", "8", "--local-window", "8"),
        ["DCA.local_window (8) must be less than chunk_size (8)"], id="dca local_window = chunk_size"),
    row(nothing, nll("{hf}", "--attention", "dca", "--attn-opt", "local_window=1000"),
        ["DCA.local_window (1000) must be less than chunk_size"], id="dca local_window over the default chunk_size"),
    row(nothing, nll("{hf}", "--attention", "dca", "--kernel", "cudnn"), ["dca has no cudnn path"],
        id="dca kernel cudnn"),
    row(device_memory_of(GiB), generate("--attention", "selfextend", "--max-new-tokens", str(10**9)),
        ["selfextend cache for 1000000", "GiB"], id="selfextend cache over memory"),
    row(device_memory_of(GiB), nll("{hf}", "--attention", "streaming", "--n-recent", str(2 * 10**9)),
        ["streaming attention over a window of 2000000", "GiB"], id="streaming window over memory"),
    row(device_memory_of(GiB), ("stream-ppl", "{tok}", "--tokens", str(10**9), "--attention", "dense"),
        ["dense cache for 1000000000 tokens", "GiB", "test device"], id="stream-ppl dense 10**9"),
    *[row(nothing, argv + ("--seed", seed), ["--seed", str(2**32 - 1)], code=2, id=f"{argv[0]} seed {seed}")
      for argv in (generate(), ("passkey", "{tok}"), FINETUNE) for seed in (str(2**70), "-1")],
    # E) silent garbage
    *[row(nothing, generate("--temperature", t), ["--temperature", t], code=2, id=f"temperature {t}")
      for t in ("nan", "inf", "-0.5")],
    *[row(nothing, generate("--temperature", "1", "--top-p", p), ["--top-p", "(0, 1]"], code=2, id=f"top-p {p}")
      for p in ("0", "1.5", "nan")],
    row(nothing, ("stream-ppl", "{tok}", "--tokens", "1"), ["--tokens", ">= 2"], code=2, id="stream-ppl 1 token"),
    row(nothing, ("passkey", "{tok}", "--lengths", "10", "--samples", "1", "--attention", "dense"),
        ["passkey length 10", "without filler"], id="passkey length below the template"),
    row(ckpt_and_longbench_data(max_position_embeddings=64),
        ("longbench", "{src}", "--data", "{data}", "--task", "qasper", "--json", "{tmp}/out.json"),
        ["training length 64 leaves no room for a prompt before qasper's 128 new tokens", "--max-length"],
        id="longbench derived max length below 1"),
    # an empty value is refused, never read as absent or as matching everything
    row(nothing, generate("--stop", ""), ["--stop: empty stop given"], id="empty stop string"),
    *[row(nothing, argv, [f"{flag}: empty", "given"], id=f"{argv[0]} empty {flag}")
      for argv, flag in ((nll("{hf}", "--mesh", ""), "--mesh"), (("ppl", "{tok}", "--json", ""), "--json"),
                         (("passkey", "{tok}", "--plot", ""), "--plot"), (("ruler", "{tok}", "--tasks", ""), "--tasks"),
                         (("ruler", "{tok}", "--haystack-file", ""), "--haystack-file"),
                         (generate("--prompt", ""), "--prompt"), (("export", "{ckpt}", ""), "out"),
                         (FINETUNE + ("--train", ""), "--train"))],
]


@pytest.mark.parametrize("setup, argv, code, needles", CASES)
def test_bad_input(setup, argv, code, needles, env, capsys):
  placeholders = dict(env.shared, tmp=env.tmp) | setup(env)
  result = run_cli(capsys, *[arg.format(**placeholders) for arg in argv])
  _assert_one_line_error(result, *needles, code=code)
  assert not [p.name for p in env.tmp.iterdir() if p.name.startswith(("out", ".out"))]  # nothing half-written


def test_passkey_minimum_is_the_template_without_filler(env, capsys):
  """The length the passkey error asks for works, and one less does not."""
  from transformers import AutoTokenizer

  from lminf_jax.eval.passkey import make_sample

  tokenizer = AutoTokenizer.from_pretrained(str(env.shared["tok"]))
  template = " ".join([PREFIX, NEEDLE.format(key=12345)]) + QUESTION  # (each key is one word, [UNK])
  minimum = len(tokenizer(template, add_special_tokens=False)["input_ids"])

  assert len(make_sample(tokenizer, minimum, np.random.default_rng(0)).token_ids) == minimum
  with pytest.raises(UserError, match=f"passkey length {minimum - 1} .* {minimum} tokens"):
    make_sample(tokenizer, minimum - 1, np.random.default_rng(0))


def test_output_exists(env, capsys):
  (env.tmp / "out").mkdir()
  _assert_one_line_error(run_cli(capsys, "convert", env.shared["hf"], env.tmp / "out"), "already exists")


def test_two_converts_to_one_output(env, capsys):
  """The run that finishes second (its `out` appeared while it converted) loses with one line."""
  from lminf_jax.models.config import LlamaConfig

  out, to_dict = env.tmp / "out", LlamaConfig.to_dict

  def finish_the_other_run_first(self):  # called while writing the checkpoint, before its rename
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text("{}")
    return to_dict(self)

  env.monkeypatch.setattr(LlamaConfig, "to_dict", finish_the_other_run_first)
  _assert_one_line_error(run_cli(capsys, "convert", env.shared["hf"], out), "output", "already exists")
  assert [p.name for p in out.iterdir()] == ["config.json"]  # the winner's output is untouched
  assert [p.name for p in env.tmp.iterdir()] == ["out"]  # no partial dir left


def test_truncated_gguf(smollm2_gguf, tmp_path, capsys):
  broken = tmp_path / "broken.gguf"
  with open(smollm2_gguf, "rb") as f:
    broken.write_bytes(f.read(40_000_000))
  _assert_one_line_error(run_cli(capsys, "convert", broken, tmp_path / "out"), "truncated or corrupt")
  assert not (tmp_path / "out").exists()


def test_identical_rope_scaling_and_parameters_are_fine(env, capsys):
  from lminf_jax.loading import convert_source

  src = hf_config(rope_scaling=ROPE, rope_parameters=dict(ROPE, rope_theta=500000.0))(env)["src"]
  config = convert_source(src)[0]
  assert (config.rope_scaling.kind, config.rope_scaling.factor, config.rope_theta) == ("llama3", 8.0, 500000.0)


def test_nan_and_inf_weights_warn_once_per_tensor(env, capsys):
  from safetensors.numpy import load_file, save_file

  src = env.copy("hf")
  tensors = load_file(src / "model.safetensors")
  tensors["model.layers.1.mlp.up_proj.weight"][3, :2] = np.nan
  tensors["model.norm.weight"][0] = np.inf
  save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
  code, out, err = run_cli(capsys, "convert", src, env.tmp / "out")
  assert code == 0 and (env.tmp / "out" / "config.json").is_file(), err
  assert sorted(err.strip().splitlines()) == [
      "lminf: warning: tensor model.layers.1.mlp.up_proj.weight has 2 NaN or Inf values",
      "lminf: warning: tensor model.norm.weight has 1 NaN or Inf values"]


def test_legacy_torch_bin_gives_the_safetensors_params(env):
  """A pre-zip (legacy) pytorch_model.bin loads (weights-only, not memory-mapped) to the same params."""
  import jax
  import torch
  from safetensors.torch import load_file

  from lminf_jax.loading import convert_source

  src = env.copy("hf")
  torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
  (src / "model.safetensors").unlink()
  legacy, reference = convert_source(src)[1], convert_source(env.shared["hf"])[1]
  assert jax.tree.structure(legacy) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(legacy), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def _as_nobody(*paths: Path):
  """`paths` unreadable (mode 000) within the block. Root reads anything, so as root the block
  also runs as user nobody (effective uid; the modules the commands import must be imported first)."""
  for path in paths:
    path.chmod(0)
  try:
    if os.geteuid() == 0:
      os.seteuid(65534)
      try:
        yield
      finally:
        os.seteuid(0)
    else:
      yield
  finally:
    for path in paths:
      path.chmod(0o644)


@pytest.mark.parametrize("argv", [("generate", "{model}", "--prompt-file", "{file}"),
                                  ("ppl", "{model}", "--text-file", "{file}")])
def test_unreadable_text_file(argv, env, capsys):
  import lminf_jax.attention  # noqa: F401  (imported before dropping to nobody)
  import lminf_jax.inference.generation  # noqa: F401
  import lminf_jax.loading  # noqa: F401

  text = env.tmp / "text.txt"
  text.write_text("The sky is blue.")
  with _as_nobody(text):
    result = run_cli(capsys, *[a.format(model=env.shared["tok"], file=text) for a in argv])
  _assert_one_line_error(result, "permission denied", str(text))


def test_unreadable_model_config(shared, capsys):
  """A model dir whose config.json cannot be read (in a dir all can reach, for nobody)."""
  import lminf_jax.inference.generation  # noqa: F401  (imported before dropping to nobody)
  import lminf_jax.sharding  # noqa: F401

  root = Path(tempfile.mkdtemp())
  try:
    root.chmod(0o755)
    src = Path(shutil.copytree(shared["hf"], root / "hf"))
    with _as_nobody(src / "config.json"):
      result = run_cli(capsys, "generate", src, "--prompt", "hi")
    _assert_one_line_error(result, "permission denied", str(src / "config.json"))
  finally:
    shutil.rmtree(root)


def _run_cli_process(*args) -> tuple[int, str, str]:
  """`python -m lminf_jax.cli ARGS`, the installed entry point, in its own process."""
  result = subprocess.run([sys.executable, "-m", "lminf_jax.cli", *map(str, args)], capture_output=True, text=True)
  return result.returncode, result.stdout, result.stderr


def test_console_script_prints_no_traceback(tmp_path):
  _assert_one_line_error(_run_cli_process("convert", tmp_path / "nope", tmp_path / "out"), "no such file", code=1)


def test_corrupt_checkpoint_params_one_short_line(env):
  """Truncated Orbax data: one short line, and none of the `Event loop is closed` tracebacks that
  Orbax's reads still in flight used to print (at random) in a process of its own."""
  src = env.copy("ckpt")
  for path in (src / "params").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  result = _run_cli_process("nll", src, "--tokens-file", env.shared["tokens"], "--out", env.tmp / "out.npy")
  _assert_one_line_error(result, "cannot restore params from", "truncated or corrupt", code=1)
  assert len(result[2].strip()) < 400 and not (env.tmp / "out.npy").exists()


@pytest.mark.parametrize("changes", [dict(), dict(tie_word_embeddings=False), dict(qkv_bias=True, o_bias=True),
                                     dict(head_dim=24, num_heads=4, num_kv_heads=1)])
def test_num_params_counts_every_param(changes):
  """The size check of configs (LlamaConfig.num_params) agrees with the params the model makes."""
  import jax

  from lminf_jax.models.config import LlamaConfig
  from lminf_jax.models.params import abstract_params

  config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=8,
                       num_kv_heads=2, head_dim=8, tie_word_embeddings=True).replace(**changes)
  assert config.num_params() == sum(s.size for s in jax.tree.leaves(abstract_params(config)))
