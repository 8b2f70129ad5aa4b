"""Perplexity against length (docs/evaluation.md#perplexity-against-length): one forward per text slice, NLL per
position, averaged per position bucket, for each attention method."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lminf_jax.errors import UserError


@dataclasses.dataclass
class PplResult:
  method: str
  length: int
  bucket_nll: list[float]  # mean NLL of the predictions at positions [i*bucket, (i+1)*bucket)
  mean_nll: float
  seconds: float


def bucket_means(nll: np.ndarray, bucket: int) -> list[float]:
  return [float(nll[i:i + bucket].mean()) for i in range(0, len(nll), bucket)]


def perplexity_vs_length(params, config, token_ids: np.ndarray, lengths: list[int], methods: dict[str, object],
                         offset: int = 0, bucket: int = 1024, progress: bool = True,
                         place=lambda tokens: tokens) -> list[PplResult]:
  """NLL per position bucket of tokens [offset, offset+L) for every length L and method.
  `place` puts each [1, L] token array on devices (e.g. sharded over a mesh)."""
  from tqdm import tqdm

  from lminf_jax.inference.forward import token_nll

  needed = offset + max(lengths)
  if len(token_ids) < needed:
    raise UserError(f"the text has {len(token_ids)} tokens, offset {offset} + length {max(lengths)} needs {needed}")
  results = []
  total = len(methods) * sum(lengths)
  with tqdm(total=total, unit="tok", disable=not progress, desc="ppl") as bar:
    for name, spec in methods.items():
      for length in lengths:
        bar.set_postfix(method=name, length=length)
        tokens = place(jnp.asarray(token_ids[offset:offset + length], jnp.int32)[None])
        start = time.perf_counter()
        nll = np.asarray(token_nll(params, config, tokens, attention=spec))[0]
        results.append(PplResult(name, length, bucket_means(nll, bucket), float(nll.mean()),
                                 time.perf_counter() - start))
        bar.update(length)
  return results


def format_table(results: list[PplResult], bucket: int) -> str:
  lines = [f"{'method':<10} {'length':>7} {'mean NLL':>9} {'ppl':>9} {'seconds':>8}   NLL per {bucket}-token bucket"]
  for r in results:
    buckets = " ".join(f"{x:.2f}" for x in r.bucket_nll)
    lines.append(f"{r.method:<10} {r.length:>7} {r.mean_nll:>9.4f} {np.exp(r.mean_nll):>9.2f} {r.seconds:>8.1f}   "
                 f"{buckets}")
  return "\n".join(lines)


def write_json(path: Path, results: list[PplResult], bucket: int, extra: dict) -> None:
  payload = dict(extra, bucket=bucket, results=[dataclasses.asdict(r) for r in results])
  path.write_text(json.dumps(payload, indent=2))


def plot(path: Path, results: list[PplResult], bucket: int, title: str) -> None:
  """NLL against position, one line per method (its longest length)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  longest = {}
  for r in results:
    if r.method not in longest or r.length > longest[r.method].length:
      longest[r.method] = r
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in longest.values():
    centers = (np.arange(len(r.bucket_nll)) + 0.5) * bucket
    ax.plot(centers, r.bucket_nll, marker="o", markersize=3, label=f"{r.method} (mean {r.mean_nll:.2f})")
  ax.set_xlabel("token position")
  ax.set_ylabel(f"NLL (mean per {bucket}-token bucket)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
