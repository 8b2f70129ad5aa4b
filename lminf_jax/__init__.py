"""lminf-jax: training-free long-context attention for Llama-family models in JAX.

The top-level API, imported on first use so that `import lminf_jax` stays cheap (no jax):
`load`, `convert_checkpoint`, `forward`, `token_nll`, `generate`, `with_rope_scaling`. Each is the
function itself, from its module (`lminf_jax.loading`, `lminf_jax.inference.forward`,
`lminf_jax.inference.generation`, `lminf_jax.models.rope_scaling`).

Packages: `attention` (the method interface, the built-in methods and their shared ops),
`inference` (forward, caches fed chunk by chunk, generation, streaming), `eval` (evaluation
tasks), `train`, `util` (process and I/O helpers), `cli`; `models` and `convert` (installed from
the repository's top-level folders).
"""

import importlib

_API = {"load": "lminf_jax.loading", "convert_checkpoint": "lminf_jax.loading",
        "forward": "lminf_jax.inference.forward", "token_nll": "lminf_jax.inference.forward",
        "generate": "lminf_jax.inference.generation", "with_rope_scaling": "lminf_jax.models.rope_scaling"}

__all__ = sorted(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'lminf_jax' has no attribute {name!r}")
  function = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = function  # (later look-ups skip this hook)
  return function


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
