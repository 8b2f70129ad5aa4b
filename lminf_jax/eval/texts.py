"""A long built-in English text that every Python install has: the Python reference manual's
help topics (`pydoc_data.topics`, about 465K characters, about 110K SmolLM2 tokens)."""

from __future__ import annotations


def builtin_text() -> str:
  from pydoc_data.topics import topics

  return "\n\n".join(topics[name] for name in sorted(topics))
