"""Self-Extend and dual chunk attention against their authors' code (scripts/compare_authors.py).

Runs only where four environment variables name the authors' checkouts and the old-transformers
pythons their code needs (CI has none of them, so it skips):

    LMINF_LONGLM=/path/to/LongLM LMINF_CHUNKLLAMA=/path/to/ChunkLlama \\
    LMINF_AUTHORS_PY438=/tmp/v-authors438/bin/python LMINF_AUTHORS_PY440=/tmp/v-authors/bin/python \\
    python -m pytest -q tests/test_authors.py

(the script's docstring says how to make the two venvs). 3 to 5 minutes on two shared CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_authors.py"
FLAGS = {"LMINF_LONGLM": "--longlm", "LMINF_CHUNKLLAMA": "--chunkllama", "LMINF_AUTHORS_PY438": "--py438",
         "LMINF_AUTHORS_PY440": "--py440"}
MISSING = [name for name in FLAGS if not os.environ.get(name)]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs the authors' code: set {', '.join(MISSING)} (checkouts of datamllab/LongLM and "
                          f"HKUNLP/ChunkLlama, pythons with transformers 4.38.2 and 4.40.2; scripts/compare_authors.py)")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
  out = tmp_path_factory.mktemp("authors") / "comparisons.json"
  args = [arg for name, flag in FLAGS.items() for arg in (flag, os.environ[name])]
  subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
  return json.loads(out.read_text())


def matching(results: dict, prefix: str, suffix: str) -> dict[str, dict]:
  found = {key: value for key, value in results.items() if key.startswith(prefix) and key.endswith(suffix)}
  assert found, f"no comparison {prefix}...{suffix}"
  return found


def test_longlm_equals_the_rule_in_float64_when_g_divides_w(results):
  """Both patch files, eager and flash (flash_attn stubbed exactly), one-shot and a prefill then decode."""
  for file in ("Llama", "Llama_4_40"):
    for key, d in matching(results, "se/4.38.2/" + file, "G4W8/float64/oneshot | rule/se/G4W8").items():
      assert d["logits"] < 1e-10, key
    for key, d in matching(results, "se/4.38.2/" + file, "G4W8/float64/cached | rule/se/G4W8").items():
      assert d["logits"] < 1e-10, key


def test_longlm_shift_when_g_does_not_divide_w(results):
  """Llama.py's eager and both files' flash prefill shift by W - W/G; Llama_4_40.py's eager by W - W//G."""
  float_rule, int_rule = "rule/se/G3W8/float", "rule/se/G3W8"
  for run in ("Llama/eager/G3W8/float64/oneshot", "Llama/flash/G3W8/float64/oneshot",
              "Llama_4_40/flash/G3W8/float64/oneshot"):
    assert results[f"se/4.38.2/{run} | {float_rule}"]["logits"] < 1e-4  # its float positions are float32
    assert results[f"se/4.38.2/{run} | {int_rule}"]["logits"] > 0.1
  for mode in ("oneshot", "cached"):
    assert results[f"se/4.38.2/Llama_4_40/eager/G3W8/float64/{mode} | {int_rule}"]["logits"] < 1e-10
  # flash decode shifts by W - W//G after a W - W/G prefill: neither rule
  assert results[f"se/4.38.2/Llama/flash/G3W8/float64/cached | {int_rule}"]["logits"] > 0.1
  assert results[f"se/4.38.2/Llama/flash/G3W8/float64/cached | {float_rule}"]["logits"] > 0.1


def test_longlm_cached_calls_take_one_token(results):
  assert "q_len should be 1 or seq_len" in results["se/4.38.2/Llama/flash/G4W8/float32/cached4"]["raises"]
  assert results["se/4.38.2/Llama/eager/G4W8/float32/cached4"]["raises"]
  # Llama_4_40.py's eager decode indexes transformers 4.38's full-size mask: 4.40's is one row
  assert results["se/4.40.2/Llama_4_40/eager/G4W8/float32/cached"]["raises"].startswith("IndexError")


def test_ours_matches_longlm(results):
  for key, d in matching(results, "se/", "G4W8/float32/oneshot | ours/se/G4W8/oneshot").items():
    assert d["logits"] < 3e-5, key
  for key, d in matching(results, "se/4.38.2/", "G4W8/float32/cached | ours/se/G4W8/decode").items():
    assert d["logits"] < 3e-5, key
  assert results["se/4.38.2/Llama_4_40/eager/G3W8/float32/oneshot | ours/se/G3W8/oneshot"]["logits"] < 3e-5
  for case in ("G4W8", "G3W8"):
    for key, d in matching(results, f"ours/se/{case}/", f" | rule/se/{case}").items():
      assert d["logits"] < 3e-5, key


def test_chunkllama_token_by_token_equals_the_rule_in_float64(results):
  for ms, rule in (("nomscale", "rule/dca"), ("mscale", "rule/dca/mscale")):
    assert results[f"dca/{ms}/float64/tokens | {rule}"]["logits"] < 1e-10
  # its float32 RoPE tables alone
  assert 1e-7 < results["dca/nomscale/float64/tokens_f32_tables | rule/dca"]["logits"] < 1e-4


def test_chunkllama_one_shot_is_the_rule_but_for_its_bfloat16_merge(results):
  assert results["dca/nomscale/float64/oneshot_exact_merge | rule/dca"]["logits"] < 1e-10
  merged = results["dca/nomscale/float64/oneshot | rule/dca"]
  assert 1e-3 < merged["nll_max"] < 5e-2
  # with its mscale, one-shot scales every logit by mscale(T / M)^2
  assert results["dca/mscale/float64/oneshot_exact_merge | rule/dca/mscale_oneshot"]["logits"] < 1e-10
  assert results["dca/mscale/float64/oneshot_exact_merge | rule/dca/mscale"]["logits"] > 0.1


def test_chunkllama_cached_calls_across_chunks_differ(results):
  assert results["dca/nomscale/float64/cached6 | rule/dca"]["logits"] > 0.1


def test_ours_matches_chunkllama(results):
  for ms in ("nomscale", "mscale"):
    assert results[f"dca/{ms}/float32/tokens | ours/{ms}/decode"]["logits"] < 2e-5
    rule = "rule/dca" if ms == "nomscale" else "rule/dca/mscale"
    for key, d in matching(results, f"ours/{ms}/", f" | {rule}").items():
      assert d["logits"] < 3e-5, key
