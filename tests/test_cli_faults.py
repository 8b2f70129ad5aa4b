"""Faults a user meets: bad output paths, read-only places, a full disk, Ctrl-C, SIGTERM and SIGKILL.

Each must give one line `lminf: error: ...` (or `lminf: interrupted`), a non-zero exit, and
leave nothing half-written. Full and read-only disks are small tmpfs mounts (root only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

PNG = b"\x89PNG\r\n\x1a\n"


def _one_error_line(err: str, *needles: str) -> str:
  """The one `lminf:` line of stderr (progress bars may share stderr), with no traceback."""
  lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("lminf:")]
  assert len(lines) == 1 and lines[0].startswith("lminf: error: "), err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _leftovers(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if ".partial" in p.name or "orbax-checkpoint-tmp" in p.name)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  out = tmp_path_factory.mktemp("src") / "hf"
  tiny_hf_model("llama_gqa").save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
  np.save(path, (np.arange(4000) * 7 % 97).astype(np.int32))
  return path


@pytest.fixture
def mount(tmp_path):
  """mount(size_kib, read_only=False) -> a fresh tmpfs dir, unmounted after the test."""
  mounted = []

  def make(size_kib: int, read_only: bool = False) -> Path:
    where = tmp_path / f"mnt{len(mounted)}"
    where.mkdir()
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    mounted.append(where)
    return where

  yield make
  for where in mounted:
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, leave_kib: int) -> None:
  """Fills a tmpfs until about `leave_kib` KiB are free."""
  stats = os.statvfs(directory)
  free = stats.f_bavail * stats.f_frsize
  (directory / "filler").write_bytes(b"\0" * max(0, free - leave_kib * 1024))


# --- output paths: checked before any work ---------------------------------------------------------

def _nll(src, tokens, out):
  return ("nll", src, "--tokens-file", tokens, "--max-tokens", 64, "--out", out)


def _ppl(src, json_out, plot_out=None):
  return ("ppl", src, "--lengths", 32, "--attention", "dense", "--json", json_out,
          *(("--plot", plot_out) if plot_out else ()))


def _finetune(src, tokens, out):
  return ("finetune", src, "--tokens-file", tokens, "--seq-len", 32, "--steps", 1, "--lr", 1e-3, "--out", out)


OUTPUT_PATHS = [  # (what, argv from (hf dir, tokens file, tmp dir), message)
    ("nll --out without .npy", lambda s, t, d: _nll(s, t, d / "result"), "must end in .npy"),
    ("nll --out a dir", lambda s, t, d: _nll(s, t, d / "dir"), "is a directory"),
    ("nll --out in a missing dir", lambda s, t, d: _nll(s, t, d / "missing" / "x.npy"), "does not exist"),
    ("ppl --json a dir", lambda s, t, d: _ppl(s, d / "dir"), "is a directory"),
    ("ppl --plot in a missing dir", lambda s, t, d: _ppl(s, d / "a.json", d / "missing" / "b.png"), "does not exist"),
    ("ppl --plot not .png", lambda s, t, d: _ppl(s, d / "a.json", d / "b.pdf"), "must end in .png"),
    ("passkey --json a dir", lambda s, t, d: ("passkey", s, "--json", d / "dir"), "is a directory"),
    ("finetune --out a file", lambda s, t, d: _finetune(s, t, d / "file"), "is a file, not a directory"),
    ("demo --out a file", lambda s, t, d: ("demo", "--out", d / "file"), "is a file, not a directory"),
    ("convert OUT a file", lambda s, t, d: ("convert", s, d / "file"), "is a file, not a directory"),
]


@pytest.mark.parametrize("what, argv, message", OUTPUT_PATHS, ids=[row[0] for row in OUTPUT_PATHS])
def test_bad_output_path(what, argv, message, hf_src, tokens_file, tmp_path, capsys):
  (tmp_path / "dir").mkdir()
  (tmp_path / "file").write_text("mine")
  before = sorted(p.name for p in tmp_path.iterdir())
  code, _, err = run_cli(capsys, *argv(hf_src, tokens_file, tmp_path))
  assert code == 1
  _one_error_line(err, message)
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even the first output
  assert (tmp_path / "file").read_text() == "mine" and not any((tmp_path / "dir").iterdir())


READ_ONLY = [  # (what, argv from (hf dir, tokens file, read-only dir)), message
    ("nll", lambda s, t, d: _nll(s, t, d / "x.npy"), "not writable"),
    ("convert", lambda s, t, d: ("convert", s, d / "ckpt"), "not writable"),
    ("finetune", lambda s, t, d: _finetune(s, t, d / "ft"), "not writable"),
    ("ppl --plot", lambda s, t, d: _ppl(s, d.parent / "a.json", d / "b.png"), "not writable"),
]


REFUSING = [  # (what, argv from (hf dir, tokens file, a directory whose file system refuses new files even to root))
    ("export", lambda s, t, d: ("export", s, d / "x")),
    ("export of a missing checkpoint", lambda s, t, d: ("export", d.parent / "no-such-checkpoint", d / "x")),
    ("convert", lambda s, t, d: ("convert", s, d / "x")),
    ("nll", lambda s, t, d: _nll(s, t, d / "x.npy")),
    ("ppl --json", lambda s, t, d: _ppl(s, d / "a.json")),
    ("finetune", lambda s, t, d: _finetune(s, t, d / "ft")),
]


@pytest.mark.parametrize("what, argv", REFUSING, ids=[row[0] for row in REFUSING])
def test_output_where_the_file_system_refuses(what, argv, hf_src, tokens_file, capsys):
  """/sys passes access() for root but refuses new files: refused before any work (the missing
  checkpoint is not even looked at), naming the directory, not a temporary."""
  code, _, err = run_cli(capsys, *argv(hf_src, tokens_file, Path("/sys")))
  assert code == 1
  _one_error_line(err, "output directory /sys is not writable")
  assert ".partial" not in err


@pytest.mark.parametrize("what, argv, message", READ_ONLY, ids=[row[0] for row in READ_ONLY])
def test_read_only_location(what, argv, message, hf_src, tokens_file, mount, capsys):
  read_only = mount(64, read_only=True)
  code, _, err = run_cli(capsys, *argv(hf_src, tokens_file, read_only))
  assert code == 1
  _one_error_line(err, message, str(read_only))
  assert not (read_only.parent / "a.json").exists()


def test_fetch_into_a_read_only_cache(mount, monkeypatch, capsys):
  cache = mount(64, read_only=True) / "cache"
  monkeypatch.setenv("LMINF_CACHE", str(cache))
  code, _, err = run_cli(capsys, "fetch", "smollm2")
  assert code == 1
  _one_error_line(err, "cannot write the model cache", str(cache), "LMINF_CACHE")


def test_dir_without_write_permission(hf_src, tokens_file, capsys):
  """Mode 0555 binds root only as another user: when we are root, the check runs as nobody."""
  top = Path(tempfile.mkdtemp())
  try:
    locked = top / "locked"
    locked.mkdir(mode=0o555)
    os.chmod(top, 0o755)
    if os.geteuid() == 0:
      os.seteuid(65534)
    try:
      code, _, err = run_cli(capsys, *_nll(hf_src, tokens_file, locked / "x.npy"))
    finally:
      if os.getuid() == 0:
        os.seteuid(0)
    assert code == 1
    _one_error_line(err, "not writable", str(locked))
  finally:
    shutil.rmtree(top)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_dir_follows_the_umask(umask, hf_src, tmp_path, capsys):
  """Not mkdtemp's 0700: other users of a shared machine read a checkpoint as the umask allows."""
  previous = os.umask(umask)
  try:
    code, _, err = run_cli(capsys, "convert", hf_src, tmp_path / "ckpt")
  finally:
    os.umask(previous)
  assert code == 0, err
  assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask


# --- a full disk --------------------------------------------------------------------------------------

def test_full_disk_nll(hf_src, tokens_file, mount, capsys):
  full = mount(64)
  _fill(full, leave_kib=0)
  code, _, err = run_cli(capsys, *_nll(hf_src, tokens_file, full / "x.npy"))
  assert code == 1
  _one_error_line(err, "no space left on device", str(full / "x.npy"))
  assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_full_disk_convert(hf_src, mount, capsys):
  full = mount(64)  # the tiny checkpoint needs about 250 KiB
  code, _, err = run_cli(capsys, "convert", hf_src, full / "ckpt")
  assert code == 1
  _one_error_line(err, "no space left on device", str(full / "ckpt"))
  assert list(full.iterdir()) == []


def test_full_disk_finetune_keeps_the_log_consistent(hf_src, tokens_file, mount, capsys):
  """The disk fills while saving step 2: the log holds only the committed step 1, nothing partial remains."""
  full = mount(1200)  # one training checkpoint of the tiny model takes about 800 KiB
  out = full / "ft"
  code, _, err = run_cli(capsys, "finetune", hf_src, "--tokens-file", tokens_file, "--seq-len", 32, "--steps", 4,
                         "--lr", 1e-3, "--out", out, "--save-every", 1, "--keep", 3)
  assert code == 1
  _one_error_line(err, "no space left on device", str(out / "checkpoints"))
  committed = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert committed == [1]
  assert [r["step"] for r in json.loads((out / "log.json").read_text())["history"]] == committed
  assert (out / "loss.png").read_bytes()[:8] == PNG
  assert _leftovers(out) == [] and _leftovers(out / "checkpoints") == [] and not (out / "final").exists()


# --- Ctrl-C, SIGTERM, SIGKILL -------------------------------------------------------------------------

def _start(*args, script: str = "", env: dict | None = None) -> subprocess.Popen:
  """`lminf ARGS` in a subprocess (after running `script`, e.g. a patch), stdout and stderr piped."""
  code = f"import sys\n{script}\nfrom lminf_jax.cli import main\nsys.exit(main(sys.argv[1:]))"
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})))


def _wait_for(process: subprocess.Popen, marker: bytes, timeout: float = 300) -> None:
  """Reads stdout until `marker` appears."""
  seen, deadline = b"", time.monotonic() + timeout
  while marker not in seen:
    byte = process.stdout.read(1)
    assert byte and time.monotonic() < deadline, (seen[-500:], process.stderr.read().decode()[-3000:])
    seen += byte


def _stop(process: subprocess.Popen, signum: int) -> tuple[int, float, str]:
  """Sends `signum`: (exit code, seconds until exit, stderr)."""
  sent = time.monotonic()
  process.send_signal(signum)
  _, err = process.communicate(timeout=60)
  return process.returncode, time.monotonic() - sent, err.decode()


def _assert_interrupted(code: int, seconds: float, err: str, signum: int = signal.SIGINT) -> None:
  assert code == 128 + signum, (code, err[-3000:])
  assert seconds < 4, seconds  # the grace period is 2 s
  assert err.rstrip().endswith("lminf: interrupted"), err[-3000:]
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]


def test_ctrl_c_stops_generate_at_the_next_token(smollm2_ckpt):
  """The decode loop is one jitted while loop: Ctrl-C ends it through the token callback, at once."""
  process = _start("generate", smollm2_ckpt, "--prompt", "Once upon a time", "--max-new-tokens", 100000,
                   "--attention", "lambda")
  _wait_for(process, b" ")  # streaming has begun: the loop is running
  sent = time.monotonic()
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  _assert_interrupted(process.returncode, time.monotonic() - sent, err.decode())
  assert b"[prefill " in out  # the loop ended by the flag, and generate returned (no forced exit)


@pytest.mark.parametrize("delay, signum", [(4, signal.SIGINT), (8, signal.SIGINT), (6, signal.SIGTERM)])
def test_interrupted_nll_exits_cleanly(delay, signum, hf_src, tmp_path):
  """Ctrl-C at some point of import, load, compile or an XLA computation: never a segfault, nothing written."""
  tokens = tmp_path / "long.npy"
  np.save(tokens, (np.arange(60000) * 7 % 97).astype(np.int32))
  process = _start("nll", hf_src, "--tokens-file", tokens, "--attention", "dense", "--out", tmp_path / "nll.npy")
  time.sleep(delay)
  assert process.poll() is None, "the computation ended before the signal: make it longer"
  _assert_interrupted(*_stop(process, signum), signum)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["long.npy"]


SLOW_SAVE = """
import time
import orbax.checkpoint as ocp
_save = ocp.Checkpointer.save
def slow_save(self, *args, **kwargs):
  _save(self, *args, **kwargs)
  print("saving", flush=True)
  time.sleep(120)
ocp.Checkpointer.save = slow_save
"""


def test_ctrl_c_during_convert_leaves_nothing(hf_src, tmp_path):
  process = _start("convert", hf_src, tmp_path / "ckpt", script=SLOW_SAVE)
  _wait_for(process, b"saving")
  _assert_interrupted(*_stop(process, signal.SIGINT))
  assert list(tmp_path.iterdir()) == []


def test_a_killed_convert_is_cleaned_up_by_the_next(hf_src, tmp_path, capsys):
  process = _start("convert", hf_src, tmp_path / "ckpt", script=SLOW_SAVE)
  _wait_for(process, b"saving")
  process.kill()
  process.communicate(timeout=60)
  stale = _leftovers(tmp_path)
  assert len(stale) == 1 and stale[0].startswith(".ckpt.partial-")
  code, _, err = run_cli(capsys, "convert", hf_src, tmp_path / "ckpt")
  assert code == 0, err
  assert f"removed {tmp_path / stale[0]}, left by an interrupted run" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _python_started(process: subprocess.Popen, timeout: float = 60) -> None:
  """Waits until the interpreter has initialised (it catches SIGINT from then on: SigCgt in /proc)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    status = Path(f"/proc/{process.pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    if caught & (1 << (signal.SIGINT - 1)):
      return
    time.sleep(0.002)
  raise AssertionError("the interpreter did not start")


@pytest.mark.parametrize("delay, signum", [(0.15, signal.SIGINT), (0.4, signal.SIGINT), (0.8, signal.SIGINT),
                                           (1.3, signal.SIGINT), (0.5, signal.SIGTERM)])
def test_a_signal_in_the_first_second_exits_with_nothing_written(delay, signum, hf_src, tmp_path):
  """Ctrl-C or SIGTERM while the command still imports jax and builds its parser: exit 128 + signal, one
  line, no traceback, and no OUT (before, the signal came before the handling: a KeyboardInterrupt
  traceback, or an exit 0 that wrote OUT)."""
  out = tmp_path / "exported"
  process = _start("export", hf_src, out)
  _python_started(process)
  time.sleep(delay)
  code, seconds, err = _stop(process, signum)
  _assert_interrupted(code, seconds, err, signum)
  assert not out.exists() and _leftovers(tmp_path) == []
