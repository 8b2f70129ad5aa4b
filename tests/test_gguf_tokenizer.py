"""GGUF tokenizers rebuilt from metadata (no torch) against transformers' own GGUF tokenizer,
against sentencepiece itself, and the run time without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lminf_jax.convert.gguf_file import open_gguf
from lminf_jax.convert.gguf_tokenizer import gguf_tokenizer, read_tokenizer_metadata
from lminf_jax.eval.passkey import make_sample

MIXED = ("Grüße, 世界! Ελληνικά, русский, العربية 🤖🚀 café\t\ttabs  and   spaces\r\n\nnew line 12345 "
         "3.14159 don't I'LL <|im_start|>user\nHi<|im_end|><|endoftext|> <s> </s> <repo_name>x")


def _reference(path: Path):
  pytest.importorskip("torch")  # transformers' GGUF reader imports torch
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ours(path: Path):
  return gguf_tokenizer(open_gguf(path), path)


def _assert_same(ours, reference, texts: list[str]) -> None:
  for text in texts:
    for special in (False, True):
      ids = reference(text, add_special_tokens=special)["input_ids"]
      assert ours(text, add_special_tokens=special)["input_ids"] == ids, (text[:80], special)
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def _write_gguf(path: Path, meta: dict) -> Path:
  """A GGUF holding `meta` as tokenizer.ggml.* metadata, a llama config and one embedding."""
  import gguf

  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_block_count(1)
  writer.add_feed_forward_length(8)
  writer.add_head_count(2)
  writer.add_tokenizer_model(meta["model"])
  if "pre" in meta:
    writer.add_tokenizer_pre(meta["pre"])
  writer.add_token_list(meta["tokens"])
  writer.add_token_types(meta["token_type"])
  if "merges" in meta:
    writer.add_token_merges(meta["merges"])
  if "scores" in meta:
    writer.add_token_scores(meta["scores"])
  writer.add_bos_token_id(meta["bos_token_id"])
  writer.add_eos_token_id(meta["eos_token_id"])
  if "add_bos_token" in meta:
    writer.add_add_bos_token(meta["add_bos_token"])
  writer.add_tensor("token_embd.weight", np.zeros((len(meta["tokens"]), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_smollm2_matches_transformers(smollm2_gguf, jargon_text):
  reference, ours = _reference(smollm2_gguf), _ours(smollm2_gguf)
  assert ours(jargon_text, add_special_tokens=False)["input_ids"] == reference(
      jargon_text, add_special_tokens=False)["input_ids"]
  _assert_same(ours, reference, [MIXED, jargon_text[:20000], " leading space", ""])
  for length in (300, 2048):  # passkey prompts: built from the same seed, token-counted by each tokenizer
    a, b = (make_sample(t, length, np.random.default_rng(length)) for t in (ours, reference))
    assert a.token_ids == b.token_ids
  for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
    assert getattr(ours, name) == getattr(reference, name), name
  assert len(ours) == len(reference)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_splits_match_transformers(pre, smollm2_gguf, tmp_path, jargon_text):
  """Llama 3's and Qwen2's pre-tokenizer splits, over SmolLM2's byte-level vocabulary."""
  meta = read_tokenizer_metadata(open_gguf(smollm2_gguf))
  path = _write_gguf(tmp_path / "bpe.gguf", dict(meta, pre=pre, add_bos_token=True))
  _assert_same(_ours(path), _reference(path), [MIXED, jargon_text[:20000]])


def test_sentencepiece_matches_transformers_and_sentencepiece(tmp_path, jargon_text):
  """A sentencepiece BPE vocabulary with byte fallback and no merges, as Llama 2 and Mistral GGUFs have
  (trained like theirs: no normalization, whitespace kept)."""
  spm = pytest.importorskip("sentencepiece")
  (tmp_path / "train.txt").write_text(jargon_text[:200_000], encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "m"), vocab_size=600,
                                 model_type="bpe", byte_fallback=True, character_coverage=0.999, minloglevel=2,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
  kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
           for i in range(sp.get_piece_size())]
  path = _write_gguf(tmp_path / "sp.gguf", dict(
      model="llama", tokens=[sp.id_to_piece(i) for i in range(sp.get_piece_size())], token_type=kinds,
      scores=[sp.get_score(i) for i in range(sp.get_piece_size())], bos_token_id=1, eos_token_id=2))
  ours = _ours(path)
  held_out = jargon_text[200_000:260_000]
  _assert_same(ours, _reference(path), [MIXED, held_out, "  two spaces first"])
  plain = held_out + " Grüße 世界 🤖\t\tx"
  assert ours(plain, add_special_tokens=False)["input_ids"] == sp.encode(plain)
  assert ours(plain)["input_ids"] == [1] + sp.encode(plain)  # llama.cpp's default for sentencepiece: BOS
  assert ours.decode(sp.encode(plain)) == sp.decode(sp.encode(plain))


def test_checkpoint_tokenizer_loads_with_autotokenizer(smollm2_gguf, tmp_path):
  from transformers import AutoTokenizer

  ours = _ours(smollm2_gguf)
  ours.save_pretrained(str(tmp_path))
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  for special in (False, True):
    assert loaded(MIXED, add_special_tokens=special)["input_ids"] == ours(MIXED, add_special_tokens=special)["input_ids"]
  assert loaded.chat_template == ours.chat_template and loaded.eos_token == ours.eos_token


def test_commands_run_without_torch(smollm2_gguf, tmp_path):
  """Every command on the real GGUF in processes where `import torch` fails (fetch and demo:
  CI runs the README's first command in a venv without torch)."""
  script = ("import sys; sys.modules['torch'] = None\n"
            "from lminf_jax.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
  env = dict(os.environ, LMINF_CACHE=str(tmp_path / "cache"))

  def lminf(*args):
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "PyTorch was not found" not in result.stderr, result.stderr[-3000:]
    return result.stdout

  ckpt = tmp_path / "ckpt"
  lminf("convert", smollm2_gguf, ckpt)
  assert "mean NLL" in lminf("nll", ckpt, "--max-tokens", 64, "--out", tmp_path / "nll.npy")
  assert np.load(tmp_path / "nll.npy").shape == (63,)
  assert "decode 4 tokens" in lminf("generate", ckpt, "--prompt", "The capital of France is", "--max-new-tokens", 4)
  assert "lambda" in lminf("ppl", ckpt, "--lengths", 128, "--bucket", 64, "--attention", "dense,lambda",
                           "--n-local", 64)
  assert "overall: mean NLL" in lminf("stream-ppl", ckpt, "--tokens", 96, "--segment", 48, "--chunk", 32,
                                      "--n-local", 32)
  assert "accuracy" in lminf("passkey", ckpt, "--lengths", 200, "--samples", 1, "--batch", 1, "--attention", "lambda")
  lminf("finetune", ckpt, "--max-tokens", 256, "--seq-len", 64, "--steps", 1, "--lr", 1e-5, "--train", "final_norm",
        "--out", tmp_path / "ft")
  assert (tmp_path / "ft" / "final" / "config.json").is_file()
