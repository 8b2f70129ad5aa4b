"""Sharding tests run in a subprocess with 8 virtual CPU devices, so every other test keeps one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lminf_jax.sharding import make_mesh, parse_mesh


def test_multidevice_suite_passes_on_8_virtual_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", LMINF_MULTIDEVICE="1")
  tests = Path(__file__).parent
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "multidevice")],
                          env=env, capture_output=True, text=True, cwd=tests.parent)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "failed" not in result.stdout


def test_mesh_parsing_and_errors():
  import pytest

  from lminf_jax.errors import UserError

  assert parse_mesh("data=2,sequence=-1") == {"data": 2, "sequence": -1}
  assert dict(make_mesh({"sequence": -1}).shape) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
  for bad, message in [("pipeline=2", "unknown mesh axis"), ("data=x", "integer"), ("data=0", "size 0")]:
    with pytest.raises(UserError, match=message):
      parse_mesh(bad)
  with pytest.raises(UserError, match="needs 4 devices"):
    make_mesh({"data": 4})
  with pytest.raises(UserError, match="only one"):
    make_mesh({"data": -1, "sequence": -1})
