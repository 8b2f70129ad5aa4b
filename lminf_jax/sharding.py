"""Meshes, logical axis rules and sequence-parallel band attention, on JAX's own runtime.

One table maps the model's logical axes onto the mesh axes `data`, `fsdp`, `tensor` and
`sequence`. A dimension whose size a mesh axis does not divide is replicated over that axis
(SmolLM2's 9 heads over tensor=2, say) instead of failing.

Use: `mesh = make_mesh({"sequence": 8})`, then run the jitted forward under
`jax.set_mesh(mesh)` with params placed by `lminf_jax.models.params.param_shardings(config, mesh)`.
This module is a leaf: it imports neither flax nor the model (which imports it).
Multi-host: call `jax.distributed.initialize()` first (on TPU pods it reads its settings from
the environment); every host then sees the global mesh.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lminf_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "layers": (),
    "embed": ("fsdp", "sequence"),  # (weights, as MaxText's: sequence parallelism divides them too)
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor", "sequence"),
    # The KV cache's [L, B, K, S, H] arrays (lminf_jax.cache.placed): a length is never split.
    "cache_batch": ("data", "fsdp"),
    "cache_length": (),
    "cache_heads": ("tensor",),
    "cache_head_dim": (),
}


def parse_mesh(text: str) -> dict[str, int]:
  """`sequence=8` or `data=2,sequence=4` (-1: the rest of the devices) -> {axis: size}."""
  sizes = {}
  for item in text.split(","):
    name, _, value = item.partition("=")
    name = name.strip()
    if name not in MESH_AXES:
      raise UserError(f"unknown mesh axis {name!r} in --mesh {text!r} (axes: {', '.join(MESH_AXES)})")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"mesh axis {name} needs an integer size, got {value!r}") from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise UserError(f"mesh axis {name} has size {sizes[name]}: use a positive size or -1")
  return sizes


def make_mesh(sizes: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
  """A mesh over all four axes; axes left out have size 1, one axis may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axis: (sizes or {}).get(axis, 1) for axis in MESH_AXES}
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise UserError(f"only one mesh axis may be -1, got {', '.join(rest)}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if len(devices) % known:
      raise UserError(f"{len(devices)} devices do not split into mesh axes of product {known} times a rest")
    sizes[rest[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise UserError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are {len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=auto, devices=devices)


def mesh_axis_size(axis: str) -> int:
  """Size of a mesh axis in the current `jax.set_mesh` context (1 outside any mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return dict(mesh.shape).get(axis, 1) if not mesh.empty else 1


def _rule(name: str | None) -> tuple[str, ...]:
  """The mesh axes of a logical axis (None: replicated); ValueError for a name not in the rules."""
  if name is None:
    return ()
  if name not in LOGICAL_AXIS_RULES:
    raise ValueError(f"unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXIS_RULES)}; None replicates)")
  return LOGICAL_AXIS_RULES[name]


def logical_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes; non-dividing mesh axes are dropped."""
  mesh_shape = dict(mesh.shape)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    axes = [a for a in _rule(name) if mesh_shape.get(a, 1) > 1 and a not in used]
    while axes and dim % math.prod(mesh_shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def head_spec(shape_btkh: tuple[int, ...], mesh, sequence: bool = False) -> PartitionSpec:
  """The PartitionSpec that splits attention's inputs [B, T, K, H] by rows and kv heads (and its
  queries [B, T, N, H] alike: whole GQA groups per shard) for a kernel run on each shard, T over
  the `sequence` axis too if asked (its size must divide T); axes that do not divide are dropped."""
  return logical_spec(("batch", "length" if sequence else None, "kv_heads", None), tuple(shape_btkh), mesh)


def on_host(x) -> bool:
  """Whether the array (or traced value) x lives in host memory (memory kind `pinned_host`)."""
  return jax.typeof(x).memory_space == jax.memory.Space.Host


def constrain(x: jnp.ndarray, *logical_axes: str | None) -> jnp.ndarray:
  """Sharding constraint by logical axes under the current mesh, in the memory x lives in; a
  no-op without one (the names are checked either way)."""
  for name in logical_axes:
    _rule(name)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  sharding = NamedSharding(mesh, logical_spec(logical_axes, x.shape, mesh),
                           memory_kind="pinned_host" if on_host(x) else None)
  return jax.lax.with_sharding_constraint(x, sharding)


def per_shard(fn, arrays: tuple, axes: tuple[tuple[str | None, ...], ...], out_axes):
  """fn(*arrays) run on each device's shard of them, with no communication (`jax.shard_map`):
  each array split by its logical axes (`axes`, one tuple per array), the outputs by `out_axes`
  (a tuple per output leaf, in fn's output structure). Directly without a mesh. For work local
  to rows and heads that XLA would otherwise gather (a dynamic slice along a split axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(dict(mesh.shape).values()) == 1:
    return fn(*arrays)
  out_shapes = jax.eval_shape(fn, *arrays)
  names_leaf = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
  out_specs = jax.tree.map(lambda names, out: logical_spec(names, out.shape, mesh), out_axes, out_shapes,
                           is_leaf=names_leaf)
  in_specs = tuple(logical_spec(names, x.shape, mesh) for names, x in zip(axes, arrays))
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)


def data_sharding(mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Sharding of a [B, T] token or position array."""
  return NamedSharding(mesh, logical_spec(("batch", "length"), shape, mesh))


def warn_dense_all_gather() -> None:
  warnings.warn("dense attention under sequence parallelism all-gathers the full keys and values "
                "(O(T) communication per layer); lambda and streaming exchange only O(n_local + n_global)",
                stacklevel=3)
