"""scripts/bench_device.py runs on the accelerator's machine, which has neither gguf nor torch and no
package index: its import chain needs neither (`--help` with both blocked), and docs/kernels.md gives
the install that builds with the installed setuptools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_device.py"
INSTALL = "pip install --no-index --no-deps --no-build-isolation -e ."


def test_imports_neither_gguf_nor_torch():
  code = ("import runpy, sys\n"
          "sys.modules['gguf'] = sys.modules['torch'] = None  # (an import of either raises ImportError)\n"
          f"sys.argv = [{str(SCRIPT)!r}, '--help']\n"
          f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "--offload-tokens" in result.stdout and "--smollm2" in result.stdout


def test_documented_install_needs_no_index():
  text = " ".join((ROOT / "docs" / "kernels.md").read_text().split())
  assert f"{INSTALL} && python scripts/bench_device.py" in text
