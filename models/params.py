"""Facts about the model's parameters, from the model itself (one abstract `init`, nothing allocated):
their shapes and dtypes, their logical axes, and their shardings on a mesh.

`lminf_jax.sharding` holds the mesh and the logical axis rules; it knows nothing of the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import Llama
from lminf_jax.sharding import logical_spec


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _boxed_params(config: LlamaConfig) -> dict:
  """The params tree of `config` with nn.LogicallyPartitioned leaves around ShapeDtypeStructs."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)["params"]


def abstract_params(config: LlamaConfig) -> dict:
  """The params tree of `config` as ShapeDtypeStructs (no memory allocated)."""
  return nn.meta.unbox(_boxed_params(config))


def param_logical_axes(config: LlamaConfig) -> dict:
  """The logical axes of every parameter (from the model's `nn.with_logical_partitioning`)."""
  return jax.tree.map(lambda box: tuple(box.names), _boxed_params(config), is_leaf=_is_box)


def param_shardings(config: LlamaConfig, mesh) -> dict:
  """NamedSharding for every parameter of `config` on `mesh` (`lminf_jax.sharding.logical_spec`)."""
  return jax.tree.map(lambda box: NamedSharding(mesh, logical_spec(tuple(box.names), box.value.shape, mesh)),
                      _boxed_params(config), is_leaf=_is_box)
