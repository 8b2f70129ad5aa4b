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


def test_unknown_logical_axis_raises():
  import jax.numpy as jnp
  import pytest

  from lminf_jax.sharding import constrain, logical_spec

  mesh = make_mesh()
  assert logical_spec((None, "batch"), (2, 4), mesh) == logical_spec((None, None), (2, 4), mesh)
  logical_spec(("cache_batch", "cache_length", "cache_heads", "cache_head_dim"), (1, 8, 2, 4), mesh)
  with pytest.raises(ValueError, match="unknown logical axis 'sequence'"):
    logical_spec(("batch", "sequence"), (2, 4), mesh)
  with pytest.raises(ValueError, match="unknown logical axis 'lenght'"):
    constrain(jnp.zeros((2, 4)), "batch", "lenght")  # checked without a mesh too


def test_sharding_is_a_leaf_module():
  """`lminf_jax.sharding` loads neither flax nor the model nor the converters."""
  code = ("import sys, lminf_jax.sharding; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax' "
          "or m.startswith(('lminf_jax.models', 'lminf_jax.convert'))))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]", result.stdout


def test_param_facts_agree():
  import jax

  from lminf_jax.models.config import LlamaConfig
  from lminf_jax.models.params import abstract_params, param_logical_axes, param_shardings

  config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=8,
                       num_kv_heads=2, head_dim=8)
  shapes, axes = abstract_params(config), param_logical_axes(config)
  shardings = param_shardings(config, make_mesh())
  assert axes["layers"]["attn"]["wq_dnh"] == ("layers", "embed", "heads", "head_dim")
  assert shapes["layers"]["attn"]["wq_dnh"].shape == (2, 64, 8, 8)
  is_names = lambda x: isinstance(x, tuple)  # noqa: E731
  assert jax.tree.structure(shapes) == jax.tree.structure(shardings) == jax.tree.structure(axes, is_leaf=is_names)
  for names, shape in zip(jax.tree.leaves(axes, is_leaf=is_names), jax.tree.leaves(shapes)):
    assert len(names) == len(shape.shape)
