"""A user's own attention method that fails, at import, construction or run time, gets one line naming
the module or class and the exception (its first line included); LMINF_TRACEBACK=1 adds the traceback."""

from __future__ import annotations

import textwrap

import pytest
from helpers import run_cli

HEADER = """
import dataclasses
import jax.numpy as jnp
from lminf_jax.attention import AttentionMethod, option
"""

MODULES = {  # module name -> (source, class, the exception's line that the error must show)
    "raises_at_import": ("raise RuntimeError('no GPU found for my kernel')", "Mine",
                         ["module 'raises_at_import' failed to import", "RuntimeError: no GPU found for my kernel"]),
    "has_a_syntax_error": ("def attend(self:\n  pass", "Mine",
                           ["module 'has_a_syntax_error' failed to import", "SyntaxError"]),
    "post_init_raises": ("""
        @dataclasses.dataclass(frozen=True)
        class Mine(AttentionMethod):
          window: int = option(8, "keys per query")

          def __post_init__(self):
            raise ValueError(f"window {self.window} is not a power of two")

          def attend(self, q, k, v, positions, pe, layer):
            return q
        """, "Mine", ["post_init_raises:Mine: Mine(window=3)", "ValueError: window 3 is not a power of two"]),
    "lacks_attend": ("""
        @dataclasses.dataclass(frozen=True)
        class Mine(AttentionMethod):
          window: int = option(8, "keys per query")
        """, "Mine", ["lacks_attend:Mine: Mine(window=3)", "TypeError: Can't instantiate abstract class Mine"]),
    "attend_raises": ("""
        @dataclasses.dataclass(frozen=True)
        class Mine(AttentionMethod):
          window: int = option(8, "keys per query")

          def attend(self, q, k, v, positions, pe, layer):
            raise KeyError("my table has no layer")
        """, "Mine", ["attention method code at attend_raises.py:", "KeyError: 'my table has no layer'"]),
}


def _write(tmp_path, name: str) -> str:
  source, cls, _ = MODULES[name]
  (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(source) + "\n")
  return f"{name}:{cls}"


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("show_traceback", [False, True], ids=["one line", "LMINF_TRACEBACK=1"])
def test_a_failing_user_method_is_one_line(name, show_traceback, tiny_model, tmp_path, monkeypatch, capsys):
  _, _, ckpt = tiny_model
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  if show_traceback:
    monkeypatch.setenv("LMINF_TRACEBACK", "1")
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", _tokens(tmp_path), "--out", tmp_path / "x.npy",
                         "--attention", _write(tmp_path, name), "--attn-opt", "window=3")
  lines = err.strip().splitlines()
  assert code == 1 and lines[-1].startswith("lminf: error: "), err
  for needle in MODULES[name][2] + ["LMINF_TRACEBACK=1"]:
    assert needle in lines[-1], (needle, lines[-1])
  if show_traceback:
    exception = MODULES[name][2][-1].split(":")[0]
    assert "Traceback (most recent call last)" in err and any(line.startswith(exception) for line in lines[:-1]), err
  else:
    assert len(lines) == 1, err
  assert not list(tmp_path.glob("x.npy*"))


def _tokens(tmp_path):
  import numpy as np

  path = tmp_path / "t.npy"
  np.save(path, np.arange(12, dtype=np.int32) % 97)
  return path
