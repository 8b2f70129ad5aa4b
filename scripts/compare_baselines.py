"""The length-generalization comparison (docs/benchmarks.md#length-generalization-baselines): every
method of ROWS on one model, through `lminf ppl`, `lminf passkey` and `lminf infinitebench`.

  python scripts/compare_baselines.py CKPT --out DIR [--text-file F] [--tasks ppl,passkey,infinitebench]
      [--rows dense,lambda,...] [--ppl-lengths 4096,...] [--passkey-length 16384] [--passkey-samples 5]
      [--ib-lengths 16384,32768] [--ib-samples 2]

Each (task, row, lengths) is one `lminf` command (its own process, timed) writing
DIR/<task>-<row>-<lengths>.json; a rerun skips the ones already there, so the comparison can be
filled in over several runs (e.g. the short lengths first). Then it
prints the markdown tables and draws DIR/ppl.png (NLL per position at the longest length).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# A row: one method of the comparison, as the `lminf` flags that select it (defaults otherwise).
ROWS = {
    "dense": ["--attention", "dense"],
    "lambda": ["--attention", "lambda"],
    "streaming": ["--attention", "streaming"],
    "infllm": ["--attention", "infllm"],
    "selfextend": ["--attention", "selfextend"],
    "dca": ["--attention", "dca"],
    "dense+yarn": ["--attention", "dense", "--rope-scaling", "yarn:factor=4"],
    "dense+dynamic": ["--attention", "dense", "--rope-scaling", "dynamic:factor=4"],
}
LMINF = [sys.executable, "-m", "lminf_jax.cli"]
TASK_NAMES = {"passkey": "R.PK", "number_string": "R.Num", "kv_retrieval": "R.KV"}  # (InfiniteBench's names)


def run_task(task: str, row: str, ckpt: str, out: Path, args) -> None:
  """One `lminf` command for (task, row), unless its JSON exists; its wall time goes into the JSON."""
  lengths = {"ppl": args.ppl_lengths, "passkey": str(args.passkey_length), "infinitebench": args.ib_lengths}[task]
  path = out / f"{task}-{row}-{lengths.replace(',', '_')}.json"
  if path.exists():
    return
  if task == "ppl":
    argv = ["ppl", ckpt, "--text-file", args.text_file, "--lengths", args.ppl_lengths]
  elif task == "passkey":
    argv = ["passkey", ckpt, "--lengths", str(args.passkey_length), "--samples", str(args.passkey_samples)]
  else:
    argv = ["infinitebench", ckpt, "--lengths", args.ib_lengths, "--samples", str(args.ib_samples), "--tasks",
            "passkey,number_string,kv_retrieval"]
  partial = out / f".{path.name}"
  start = time.perf_counter()
  print(f"[{time.strftime('%H:%M:%S')}] {task} {row}", flush=True)
  result = subprocess.run(LMINF + argv + ROWS[row] + ["--json", str(partial)], capture_output=True, text=True)
  if result.returncode:
    print(f"  failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}", flush=True)
    return
  report = json.loads(partial.read_text())
  report["wall_seconds"] = time.perf_counter() - start
  path.write_text(json.dumps(report, indent=2))
  partial.unlink()


def reports(out: Path, task: str, rows: list[str]) -> dict[str, list[dict]]:
  """Each row's JSON reports of `task` (one per run: runs may cover different lengths)."""
  found = {row: [json.loads(p.read_text()) for p in sorted(out.glob(f"{task}-{row}-*.json"))] for row in rows}
  return {row: reps for row, reps in found.items() if reps}


def ppl_table(out: Path, rows: list[str]) -> str:
  found = reports(out, "ppl", rows)
  lengths = sorted({r["length"] for reps in found.values() for rep in reps for r in rep["results"]})
  lines = ["| method | " + " | ".join(f"{n // 1024}K NLL (s)" for n in lengths) + " |",
           "| --- |" + " --- |" * len(lengths)]
  for row, reps in found.items():
    by_length = {r["length"]: r for rep in reps for r in rep["results"]}
    cells = [f"{by_length[n]['mean_nll']:.3f} ({by_length[n]['seconds']:.0f})" if n in by_length else "" for n in lengths]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def score_table(out: Path, task: str, rows: list[str], cell, label=str, key: str = "score") -> str:
  """Mean `key` x 100 per row and `cell(result)` column (headed `label(column)`; its sample count), with
  the wall time of each of the row's commands (in file order: by lengths)."""
  found = reports(out, task, rows)
  columns = sorted({cell(r) for reps in found.values() for rep in reps for r in rep["results"]})
  lines = ["| method | " + " | ".join(map(label, columns)) + " | wall s |", "| --- |" + " --- |" * (len(columns) + 1)]
  for row, reps in found.items():
    results = [r for rep in reps for r in rep["results"]]
    cells = []
    for col in columns:
      scores = [float(r[key]) for r in results if cell(r) == col]
      cells.append(f"{100 * sum(scores) / len(scores):.0f} ({len(scores)})" if scores else "")
    lines.append(f"| {row} | " + " | ".join(cells) + " | " + " + ".join(f"{rep['wall_seconds']:.0f}" for rep in reps)
                 + " |")
  return "\n".join(lines)


def plot(out: Path, rows: list[str]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for row, reps in reports(out, "ppl", rows).items():
    longest = max((r for rep in reps for r in rep["results"]), key=lambda r: r["length"])
    centers = [(i + 0.5) * reps[0]["bucket"] for i in range(len(longest["bucket_nll"]))]
    ax.plot(centers, longest["bucket_nll"], marker="o", markersize=2, label=f"{row} ({longest['mean_nll']:.2f})")
  ax.set_xlabel("token position")
  ax.set_ylabel("NLL (mean per bucket)")
  ax.set_ylim(top=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "ppl.png", dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("ckpt")
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--text-file", default=str(Path(__file__).resolve().parents[2] / "shared/data/jargon.txt"))
  parser.add_argument("--tasks", default="ppl,passkey,infinitebench")
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--ppl-lengths", default="4096,8192,16384,32768")
  parser.add_argument("--passkey-length", type=int, default=16384)
  parser.add_argument("--passkey-samples", type=int, default=5)
  parser.add_argument("--ib-lengths", default="16384,32768")
  parser.add_argument("--ib-samples", type=int, default=2)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  rows, tasks = args.rows.split(","), [t for t in args.tasks.split(",") if t]  # (no task: the tables only)
  unknown = [t for t in tasks if t not in ("ppl", "passkey", "infinitebench")] + [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown task or row: {', '.join(unknown)}")
  for task in tasks:
    for row in rows:
      run_task(task, row, args.ckpt, args.out, args)
  print(ppl_table(args.out, rows))
  print(score_table(args.out, "passkey", rows, lambda r: r["length"], lambda n: f"{n // 1024}K", key="correct"))
  order = list(TASK_NAMES)
  print(score_table(args.out, "infinitebench", rows, lambda r: (r["length"], order.index(r["task"])),
                    lambda c: f"{TASK_NAMES[order[c[1]]]} {c[0] // 1024}K"))
  plot(args.out, rows)


if __name__ == "__main__":
  main()
