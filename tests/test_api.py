"""The top-level API (`lminf_jax.load`, `convert_checkpoint`, `forward`, `token_nll`, `generate`,
`with_rope_scaling`) as a user calls it, each case in a fresh interpreter (what was imported before
matters), against the functions imported from their modules in this process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model, torch_logits

from lminf_jax.inference.forward import forward, token_nll

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 12)).astype(np.int32)
README = Path(__file__).resolve().parents[1] / "README.md"


def _run(code: str, out: Path, env: dict | None = None, **names: object) -> dict[str, np.ndarray]:
  """Runs `code` in a fresh interpreter with np, TOKENS, OUT and `names` defined; returns the
  arrays it saved to OUT."""
  prelude = "".join(f"{k} = {v!r}\n" for k, v in dict(names, OUT=str(out)).items())
  prelude += f"import numpy as np\nTOKENS = np.asarray({TOKENS.tolist()}, np.int32)\n"
  result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


CASES = {
    "forward_called_twice": """
        import lminf_jax
        config, params, _ = lminf_jax.load(CKPT)
        np.savez(OUT, logits_first=lminf_jax.forward(params, config, TOKENS),
                 logits_second=lminf_jax.forward(params, config, TOKENS))
        """,
    "token_nll_accessed_first": """
        import lminf_jax
        lminf_jax.token_nll
        config, params, _ = lminf_jax.load(CKPT)
        np.savez(OUT, logits=lminf_jax.forward(params, config, TOKENS), nll=lminf_jax.token_nll(params, config, TOKENS),
                 logits_again=lminf_jax.forward(params, config, TOKENS))
        """,
    "submodule_imported_first": """
        import lminf_jax.inference.forward as module
        from lminf_jax.inference.forward import forward
        import lminf_jax
        assert lminf_jax.forward is forward and module.forward is forward and module.forward_cached
        config, params, _ = lminf_jax.load(CKPT)
        np.savez(OUT, logits=lminf_jax.forward(params, config, TOKENS), logits_imported=forward(params, config, TOKENS),
                 nll=lminf_jax.token_nll(params, config, TOKENS))
        """,
    "convert_after_load": """
        import lminf_jax
        lminf_jax.load(CKPT)  # imports the subpackage lminf_jax.convert
        out = lminf_jax.convert_checkpoint(HF, CONVERTED)
        import lminf_jax.convert.checkpoint as checkpoint
        assert checkpoint.is_checkpoint(out)
        config, params, _ = lminf_jax.load(out)
        generated = lminf_jax.generate(params, config, [TOKENS[0].tolist()], 6, eos_ids=())[0]
        np.savez(OUT, logits=lminf_jax.forward(params, config, TOKENS), generated=generated)
        """,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_works_whatever_was_imported_before(tiny_model, tmp_path, case):
  config, params, ckpt = tiny_model
  hf = tmp_path / "hf"
  tiny_hf_model("llama_gqa").save_pretrained(hf)  # the model behind tiny_model
  got = _run(CASES[case], tmp_path / "out.npz", CKPT=str(ckpt), HF=str(hf), CONVERTED=str(tmp_path / "converted"))
  expected = {"logits": np.asarray(forward(params, config, jnp.asarray(TOKENS))),
              "nll": np.asarray(token_nll(params, config, jnp.asarray(TOKENS)))}
  for name, value in got.items():
    if name == "generated":  # greedy: each new token is the argmax of the one-shot logits before it
      logits = forward(params, config, jnp.asarray([TOKENS[0].tolist() + value.tolist()]))
      np.testing.assert_array_equal(np.asarray(logits[0, TOKENS.shape[1] - 1:-1]).argmax(-1), value)
    else:
      np.testing.assert_allclose(value, expected[name.split("_")[0]], atol=1e-6, err_msg=name)
  assert len(got) >= 2


def test_readme_python_api_runs_as_written(tiny_model, tmp_path):
  """The README's Python API code, verbatim, with the tiny model at the path it loads: its
  logits and NLL match transformers."""
  _, _, ckpt = tiny_model
  section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
  code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.DOTALL))
  home = tmp_path / "home"
  (home / ".cache" / "lminf_jax").mkdir(parents=True)
  (home / ".cache" / "lminf_jax" / "smollm2-135m-instruct").symlink_to(ckpt)
  got = _run("tokens_bt = TOKENS\n" + code + "\nnp.savez(OUT, logits=logits_btv, nll=nll_bt)\n", tmp_path / "out.npz",
             env=dict(os.environ, HOME=str(home)))
  logits = torch_logits(tiny_hf_model("llama_gqa"), TOKENS)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(got["logits"], logits, atol=1e-4)
  # (12 tokens are far inside Lambda's window: the NLL is dense attention's)
  np.testing.assert_allclose(got["nll"], -np.take_along_axis(log_probs[:, :-1], TOKENS[:, 1:, None], -1)[..., 0],
                             atol=1e-4)


def test_import_is_cheap():
  code = "import sys, lminf_jax; assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')], sys.modules"
  result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


def test_top_level_names_are_the_functions_themselves():
  """No module class swapping: `lminf_jax` is a plain module, and each API name is its function, so
  `inspect.signature` and `help()` show the function's own."""
  code = textwrap.dedent("""
      import inspect, sys, types
      import lminf_jax
      from lminf_jax.inference import forward as forward_module, generation
      from lminf_jax import loading
      assert type(sys.modules["lminf_jax"]) is types.ModuleType
      import lminf_jax.convert.checkpoint  # the converters' package keeps its name
      assert isinstance(lminf_jax.convert, types.ModuleType)
      from lminf_jax.models import rope_scaling
      for name, module in (("load", loading), ("convert_checkpoint", loading), ("forward", forward_module),
                           ("token_nll", forward_module), ("generate", generation),
                           ("with_rope_scaling", rope_scaling)):
        function = getattr(lminf_jax, name)
        assert function is getattr(module, name) and not isinstance(function, types.ModuleType), name
        assert inspect.signature(function) == inspect.signature(getattr(module, name)), name
      assert sorted(lminf_jax.__all__) == ["convert_checkpoint", "forward", "generate", "load", "token_nll",
                                           "with_rope_scaling"]
      """)
  result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
