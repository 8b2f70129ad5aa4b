"""A GGUF's tokenizer, rebuilt from its metadata with `tokenizers` (no torch, no download).

llama.cpp stores the vocabulary, merges, token types, special token ids, pre-tokenizer name and
chat template as `tokenizer.*` metadata. Two vocabulary kinds cover the supported families:

- `gpt2`: byte-level BPE (Llama 3, Qwen2, SmolLM2). Text is split by the pre-tokenizer's regex
  (GPT-2's unless `tokenizer.ggml.pre` names a Llama 3 or Qwen2 split), then mapped to the
  byte alphabet.
- `llama`: sentencepiece BPE with byte fallback (Llama 2, Mistral). Files without merges get
  them from the token scores.

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so
both stay whole in a text. The result equals transformers' own GGUF tokenizer (tested).
"""

from __future__ import annotations

from pathlib import Path

from lminf_jax.errors import UserError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer splits by `tokenizer.ggml.pre`; any other name gets GPT-2's (ByteLevel's own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
  """Sentencepiece files without merges: every split of a token into two tokens is a merge,
  ranked by the merged token's score (best first)."""
  ranked = []
  for token, index in vocab.items():
    pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
    pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
    ranked += [(scores[index], left, right) for left, right in pairs]
  ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
  return [(left, right) for _, left, right in ranked]


def _byte_level(meta: dict):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  vocab = {(t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(meta["tokens"])}
  merges = [tuple(m.split(" ")) for m in meta.get("merges", [])]
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(meta.get("pre"))
  if split is None:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer, letters


def _sentencepiece(meta: dict):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(meta["tokens"])}
  if "merges" in meta:
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
  elif "scores" in meta:
    merges = _merges_from_scores(vocab, meta["scores"])
  else:
    raise ValueError("a sentencepiece vocabulary needs merges or scores")
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
  prefix = meta.get("add_space_prefix", True)
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
  return tokenizer, None


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def read_tokenizer_metadata(reader) -> dict:
  """The `tokenizer.*` fields of an open `gguf.GGUFReader`, under short names."""
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml."):
      meta[key.removeprefix("tokenizer.ggml.")] = field.contents()
    elif key == "tokenizer.chat_template":
      meta["chat_template"] = field.contents()
  return meta


def build_tokenizer(meta: dict):
  """tokenizer.* metadata -> a transformers fast tokenizer (PreTrainedTokenizerFast)."""
  from tokenizers import AddedToken, processors
  from transformers import PreTrainedTokenizerFast

  kind = meta.get("model")
  if kind not in _BUILDERS:
    raise ValueError(f"unsupported tokenizer model {kind!r} (supported: {', '.join(_BUILDERS)})")
  tokens, types = meta["tokens"], meta.get("token_type") or [1] * len(meta["tokens"])
  backend, letters = _BUILDERS[kind](meta)
  # A byte-level vocabulary spells every real token in its alphabet: a "control" token outside it
  # is a mislabel, and adding it would grow the vocabulary past the model's.
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind_ in zip(tokens, types)
                              if kind_ == CONTROL and (letters is None or set(t) <= letters)])
  vocab = backend.get_vocab()
  backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind_ in zip(tokens, types)
                      if kind_ == USER_DEFINED and t in vocab])
  ids = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
  special = {name: tokens[meta[key]] for name, key in ids.items() if 0 <= meta.get(key, -1) < len(tokens)}
  add_bos = meta.get("add_bos_token", kind == "llama") and "bos" in special
  add_eos = meta.get("add_eos_token", False) and "eos" in special
  if add_bos or add_eos:
    pieces = [special["bos"]] * add_bos, [special["eos"]] * add_eos
    single = " ".join([*pieces[0], "$A", *pieces[1]])
    pair = " ".join([*pieces[0], "$A", *pieces[1], *pieces[0], "$B", *pieces[1]])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {*pieces[0], *pieces[1]}])
  return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=meta.get("chat_template"),
                                 **{f"{name}_token": token for name, token in special.items()})


def gguf_tokenizer(reader, path: Path):
  """The tokenizer of an open GGUF file, as a transformers fast tokenizer."""
  meta = read_tokenizer_metadata(reader)
  if "tokens" not in meta:
    raise UserError(f"{path} has no tokenizer (no tokenizer.ggml.tokens)")
  try:
    return build_tokenizer(meta)
  except Exception as e:  # tokenizers raises Exception subclasses of its own on bad vocabularies
    raise UserError(f"cannot build the tokenizer of {path}: {type(e).__name__}: {e}") from None
