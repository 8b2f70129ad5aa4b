"""lminf-jax: training-free long-context attention for Llama-family models in JAX.

Top-level API, imported on first use so that `import lminf_jax` stays cheap (no jax):
`load`, `convert`, `forward`, `token_nll`, `generate`.

`forward` and `convert` are also submodules (`lminf_jax.forward`, `lminf_jax.convert`), and
importing a submodule, from anywhere, binds it as the package attribute of its name. So that
attribute is the submodule, made callable as it is bound (the package's class does it):
`lminf_jax.forward(...)` calls `lminf_jax.forward.forward`, `lminf_jax.convert(...)` calls
`lminf_jax.loading.convert`, and `lminf_jax.forward.forward_cached`, `import
lminf_jax.convert.checkpoint as checkpoint` keep working.
"""

import importlib
import sys
import types

_API = {"load": "lminf_jax.loading", "convert": "lminf_jax.loading", "forward": "lminf_jax.forward",
        "token_nll": "lminf_jax.forward", "generate": "lminf_jax.generation"}


def _function(name: str):
  return getattr(importlib.import_module(_API[name]), name)


class _CallableModule(types.ModuleType):
  """A submodule named like an API function: calling it calls that function."""

  def __call__(self, *args, **kwargs):
    return _function(self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):

  def __setattr__(self, name: str, value: object) -> None:
    if name in _API and type(value) is types.ModuleType:  # the import system binding a submodule
      value.__class__ = _CallableModule
    super().__setattr__(name, value)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'lminf_jax' has no attribute {name!r}")
  function = _function(name)
  return globals().get(name, function)  # the submodule of that name if importing bound one


sys.modules[__name__].__class__ = _Package
