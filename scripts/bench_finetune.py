"""Fine-tuning benchmark (issue 7): SmolLM2 under lambda attention on jargon.txt.

Splits the text at --train-fraction: `lminf finetune` trains on the head, `lminf ppl` measures
the held-back tail before and after. Each command is its own process, so its peak RSS is its own.
Runs: the full run with rematerialisation, and --probe-steps steps without and with it (for peak
RSS and tokens/s side by side in one session).

  python scripts/bench_finetune.py --text ../shared/data/jargon.txt --out /tmp/ft-bench
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def lminf(*args: str) -> str:
  """Runs `lminf ARGS` under /usr/bin/time -v: stdout + the max resident set size line."""
  cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lminf_jax.cli", *map(str, args)]
  print("$ lminf " + " ".join(map(str, args)), flush=True)
  start = time.perf_counter()
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")
  rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
  print(result.stdout, f"[{time.perf_counter() - start:.0f} s, peak RSS {int(rss.group(1)) / 1024:.0f} MiB]",
        flush=True)
  return result.stdout


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--text", default="../shared/data/jargon.txt")
  p.add_argument("--out", default="/tmp/ft-bench")
  p.add_argument("--ckpt", help="default: lminf fetch smollm2")
  p.add_argument("--train-fraction", type=float, default=0.75)
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--probe-steps", type=int, default=3)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--eval-lengths", default="4096,16384")
  args = p.parse_args()

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  ckpt = args.ckpt or lminf("fetch", "smollm2").strip().splitlines()[-1]
  text = Path(args.text).read_text(encoding="utf-8")
  split = int(len(text) * args.train_fraction)
  (out / "train.txt").write_text(text[:split], encoding="utf-8")
  (out / "held.txt").write_text(text[split:], encoding="utf-8")
  attention = ["--attention", "lambda", "--n-global", "10", "--n-local", "2048"]
  train = ["--text-file", out / "train.txt", "--seq-len", args.seq_len, "--lr", args.lr, "--train", "attn/",
           *attention]

  for name, extra in (("no-remat", ["--no-remat"]), ("remat", [])):
    lminf("finetune", ckpt, *train, "--steps", args.probe_steps, "--out", out / f"probe-{name}", *extra)
  lminf("finetune", ckpt, *train, "--steps", args.steps, "--save-every", 10, "--out", out / "run")
  history = json.loads((out / "run" / "log.json").read_text())["history"]
  print("loss curve:", " ".join(f"{r['loss']:.3f}" for r in history))
  for label, model in (("before", ckpt), ("after", out / "run" / "final")):
    print(f"held-back perplexity {label}:")
    lminf("ppl", model, "--text-file", out / "held.txt", "--lengths", args.eval_lengths, "--attention", "lambda,dense",
          "--n-global", 10, "--n-local", 2048, "--json", out / f"ppl-{label}.json")


if __name__ == "__main__":
  main()
