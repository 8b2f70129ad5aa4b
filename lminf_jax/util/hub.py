"""Checkpoints by their Hugging Face hub id, `ORG/NAME[@REVISION]`, as transformers users name them.

`huggingface_hub.snapshot_download` fetches only what conversion needs (it honours HF_HOME,
HF_HUB_OFFLINE and the token as transformers does); the converted checkpoint is kept in lminf's
cache (`cache_dir()/hub/ORG--NAME/COMMIT-DTYPE`), so a second run converts nothing. A path that
exists always wins over a hub id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from lminf_jax.errors import UserError
from lminf_jax.util.fetch import cache_dir, cached_conversion

# What conversion reads: the weights (safetensors and their index), the configs, the tokenizer.
ALLOW_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt")
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


class HubId(NamedTuple):
  repo: str  # ORG/NAME
  revision: str | None  # a branch, tag or commit; None: the default branch


def hub_id(text: str | Path) -> HubId | None:
  """The hub id `text` names, or None: it is a path that exists, or not of the form ORG/NAME[@REVISION]."""
  text = str(text)
  if Path(text).expanduser().exists() or not (match := _HUB_ID.fullmatch(text)):
    return None
  return HubId(match["repo"], match["revision"])


def snapshot(hub: HubId) -> Path:
  """The local snapshot dir of `hub` (downloaded if needed and allowed); one line if it can't be had."""
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                      RevisionNotFoundError)

  name = hub.repo + (f"@{hub.revision}" if hub.revision else "")
  try:
    return Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=list(ALLOW_PATTERNS)))
  except GatedRepoError:
    raise UserError(f"{name}: a gated repository; accept its terms on the hub and log in (HF_TOKEN)") from None
  except RevisionNotFoundError:
    raise UserError(f"{name}: no revision {hub.revision!r} on the hub") from None
  except RepositoryNotFoundError:
    raise UserError(f"{name}: no such path, and no such model on the hub (or it is private: set HF_TOKEN)") from None
  except LocalEntryNotFoundError:
    raise UserError(f"{name}: no such path, and not in the local hub cache (offline, or the hub is unreachable)") \
        from None
  except (HfHubHTTPError, OSError) as e:
    line = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"{name}: cannot download from the hub: {type(e).__name__}: {line}") from None


def cached_checkpoint(hub: HubId, dtype: str | None = None) -> Path:
  """The checkpoint dir of `hub` in `dtype` (default: its own, `saved_param_dtype`), converted once and
  kept in lminf's cache by repo and commit."""
  from lminf_jax.convert.hf import saved_param_dtype

  source = snapshot(hub)  # snapshots/<commit>: a moving branch gets a new conversion, a fixed commit one only
  dtype = dtype or saved_param_dtype(source)
  out = cache_dir() / "hub" / hub.repo.replace("/", "--") / f"{source.name}-{dtype}"
  return cached_conversion(lambda: source, out, dtype)
