"""The attention methods by name: the built-in ones, and any `package.module:ClassName`."""

from __future__ import annotations

import importlib
import sys

from lminf_jax.attention.dca import DCA
from lminf_jax.attention.dense import Dense
from lminf_jax.attention.infllm import InfLLM
from lminf_jax.attention.lminfinite import Lambda
from lminf_jax.attention.method import AttentionMethod
from lminf_jax.attention.selfextend import SelfExtend
from lminf_jax.attention.streaming import Streaming
from lminf_jax.errors import UserCodeError, UserError

ATTENTION_METHODS: dict[str, type[AttentionMethod]] = {"dense": Dense, "lambda": Lambda, "streaming": Streaming,
                                                       "infllm": InfLLM, "selfextend": SelfExtend, "dca": DCA}

USER_FILES: set[str] = set()  # the files of the users' method modules imported by `method_class`


def method_class(name: str) -> type[AttentionMethod]:
  """A built-in method's class, or the `AttentionMethod` subclass `package.module:ClassName`
  (imported as Python would, from the current directory too)."""
  if name in ATTENTION_METHODS:
    return ATTENTION_METHODS[name]
  module_name, colon, class_name = name.partition(":")
  if not colon or not module_name or not class_name:
    raise UserError(f"unknown attention method {name!r} (choose from {', '.join(ATTENTION_METHODS)}, or give "
                    f"package.module:ClassName)")
  if "" not in sys.path and "." not in sys.path:
    sys.path.insert(0, "")  # (as `python -m` does: a module beside the user's files)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"cannot import attention method module {module_name!r}: {e}") from None
  except Exception as e:  # raised by the module's own code, a SyntaxError included
    raise UserCodeError(f"attention method module {module_name!r} failed to import", e) from e
  if getattr(module, "__file__", None):
    USER_FILES.add(module.__file__)
  cls = getattr(module, class_name, None)
  if not (isinstance(cls, type) and issubclass(cls, AttentionMethod)):
    raise UserError(f"{name} is not an attention method (a subclass of lminf_jax.attention.AttentionMethod)")
  return cls


def resolve(spec: AttentionMethod, max_position_embeddings: int, sliding_window: int | None = None) -> AttentionMethod:
  """`spec` with the model's defaults filled in (n_local=None -> the training length). On a model
  with a sliding window, `Dense` is that window (`SlidingWindow`)."""
  if not isinstance(spec, AttentionMethod):
    raise UserError(f"unknown attention method {spec!r} (not a lminf_jax.attention.AttentionMethod)")
  spec = spec.resolve(max_position_embeddings, sliding_window)
  if not spec.resolved:
    raise UserError(f"{spec.name}.resolve left options unset: {spec}")
  return spec


def raised_in_user_code(error: BaseException) -> str | None:
  """'module.py:LINE' of the innermost frame of a user's method module (`USER_FILES`) in the traceback
  of `error` or of the errors it was raised from, or None: where a user's method failed at run time."""
  import os
  import traceback

  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename in USER_FILES]
    if frames:
      return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
    error = error.__cause__ or error.__context__
  return None
