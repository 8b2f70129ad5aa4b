"""lminf-jax: training-free long-context attention for Llama-family models in JAX.

Top-level API (imported lazily, so `import lminf_jax` stays cheap):
`load`, `convert`, `forward`, `token_nll`, `generate`.
"""

_API = {"load": "lminf_jax.loading", "convert": "lminf_jax.loading", "forward": "lminf_jax.forward",
        "token_nll": "lminf_jax.forward", "generate": "lminf_jax.generation"}


def __getattr__(name: str):
  if name in _API:
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'lminf_jax' has no attribute {name!r}")
