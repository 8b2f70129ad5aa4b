"""Every bad input gets exit code != 0 and exactly one line `lminf: error: ...` naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model


def _assert_one_line_error(result, *needles: str):
  code, out, err = result
  assert code not in (0, None), (code, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("lminf: error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  out = tmp_path_factory.mktemp("src") / "hf"
  tiny_hf_model("llama_gqa").save_pretrained(out)
  return out


@pytest.fixture
def copy_src(hf_src, tmp_path):
  dst = tmp_path / "hf_copy"
  shutil.copytree(hf_src, dst)
  return dst


def _edit_config(model_dir, **changes):
  path = model_dir / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_missing_path(tmp_path, capsys):
  _assert_one_line_error(run_cli(capsys, "convert", tmp_path / "nope", tmp_path / "out"), "no such file", "nope")
  assert not (tmp_path / "out").exists()


def test_not_a_model_dir(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  _assert_one_line_error(run_cli(capsys, "convert", tmp_path / "empty", tmp_path / "out"), "not a model dir")


def test_not_a_gguf_file(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  _assert_one_line_error(run_cli(capsys, "convert", tmp_path / "notes.txt", tmp_path / "out"), "not a .gguf")


def test_unsupported_model_type(copy_src, tmp_path, capsys):
  _edit_config(copy_src, model_type="gpt2")
  _assert_one_line_error(run_cli(capsys, "convert", copy_src, tmp_path / "out"), "unsupported model_type", "gpt2")


def test_tensor_shape_mismatch_names_tensor_and_shapes(copy_src, tmp_path, capsys):
  _edit_config(copy_src, intermediate_size=81)
  _assert_one_line_error(run_cli(capsys, "convert", copy_src, tmp_path / "out"),
                         "tensor model.layers.0.mlp.", "has shape (", "80", "expected (", "81")
  assert not (tmp_path / "out").exists()


def test_truncated_safetensors(copy_src, tmp_path, capsys):
  weights = copy_src / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  _assert_one_line_error(run_cli(capsys, "convert", copy_src, tmp_path / "out"), "truncated or corrupt")
  assert list(tmp_path.glob("*out*")) == []


def test_corrupt_torch_bin(copy_src, tmp_path, capsys):
  (copy_src / "model.safetensors").unlink()
  (copy_src / "pytorch_model.bin").write_bytes(b"\x80\x02not a pickle" * 100)
  _assert_one_line_error(run_cli(capsys, "convert", copy_src, tmp_path / "out"), "truncated or corrupt")


def test_truncated_gguf(smollm2_gguf, tmp_path, capsys):
  broken = tmp_path / "broken.gguf"
  with open(smollm2_gguf, "rb") as f:
    broken.write_bytes(f.read(40_000_000))
  _assert_one_line_error(run_cli(capsys, "convert", broken, tmp_path / "out"), "truncated or corrupt")
  assert not (tmp_path / "out").exists()


def test_output_exists(hf_src, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  _assert_one_line_error(run_cli(capsys, "convert", hf_src, tmp_path / "out"), "already exists")


@pytest.fixture
def tokens_file(tmp_path):
  path = tmp_path / "tokens.npy"
  np.save(path, np.arange(20) % 97)
  return path


def test_unknown_attention_method(hf_src, tokens_file, tmp_path, capsys):
  result = run_cli(capsys, "nll", hf_src, "--tokens-file", tokens_file, "--out", tmp_path / "n.npy",
                   "--attention", "sparse")
  _assert_one_line_error(result, "unknown attention method", "sparse")
  assert not (tmp_path / "n.npy").exists()


@pytest.mark.parametrize("flag", ["--max-tokens", "--chunk"])
@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_non_positive_length(flag, value, hf_src, tokens_file, tmp_path, capsys):
  result = run_cli(capsys, "nll", hf_src, "--tokens-file", tokens_file, "--out", tmp_path / "n.npy", flag, value)
  _assert_one_line_error(result, flag)


def test_bad_tokens_files(hf_src, tmp_path, capsys):
  out = tmp_path / "n.npy"
  _assert_one_line_error(run_cli(capsys, "nll", hf_src, "--tokens-file", tmp_path / "none.npy", "--out", out),
                         "no such file")
  np.save(tmp_path / "2d.npy", np.zeros((2, 3), np.int64))
  _assert_one_line_error(run_cli(capsys, "nll", hf_src, "--tokens-file", tmp_path / "2d.npy", "--out", out), "1-D")
  np.save(tmp_path / "big.npy", np.array([1, 2, 5000]))
  _assert_one_line_error(run_cli(capsys, "nll", hf_src, "--tokens-file", tmp_path / "big.npy", "--out", out),
                         "[0, 97)")
  np.save(tmp_path / "one.npy", np.array([1]))
  _assert_one_line_error(run_cli(capsys, "nll", hf_src, "--tokens-file", tmp_path / "one.npy", "--out", out),
                         "at least 2 tokens")
  (tmp_path / "junk.npy").write_bytes(b"junk")
  _assert_one_line_error(run_cli(capsys, "nll", hf_src, "--tokens-file", tmp_path / "junk.npy", "--out", out),
                         "not a valid .npy")
  assert not out.exists()


def test_console_script_prints_no_traceback(tmp_path):
  """The installed `lminf` entry point itself: exit 1, one line on stderr."""
  result = subprocess.run([sys.executable, "-m", "lminf_jax.cli", "convert", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True)
  _assert_one_line_error((result.returncode, result.stdout, result.stderr), "no such file")
