"""Ctrl-C and SIGTERM for the command line: stop within a second or two, leave nothing partial.

Python runs a signal handler only between bytecodes of the main thread, and the main thread
spends most of a command inside one XLA computation. So the signal is taken by a watcher
thread (through `signal.set_wakeup_fd`), which sets a flag at once: `generate`'s decode loop
reads it at its next token (the host callback that streams tokens) and ends cleanly. Whatever
has not ended `GRACE` seconds later, or at a second signal, is ended by `exit_now`: it removes
the outputs registered as partial, prints `lminf: interrupted` and leaves with `os._exit`.
Leaving that way skips the interpreter's teardown while XLA's threads still run, which is
what segfaulted before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

GRACE = 2.0  # seconds between the first signal and the forced exit

_requested = threading.Event()
_signal_number: list[int] = []
_partial: dict[Path, int] = {}  # outputs being written -> nesting count
_lock = threading.RLock()  # held by exit_now and by a commit (`unless_interrupted`)


def requested() -> bool:
  """True once Ctrl-C (or SIGTERM) arrived: a long loop should stop at its next step."""
  return _requested.is_set()


@contextlib.contextmanager
def partial(path: Path) -> Iterator[Path]:
  """Registers `path` (a file or dir being written) for removal if the process is interrupted."""
  path = Path(path)
  with _lock:
    _partial[path] = _partial.get(path, 0) + 1
  try:
    yield path
  finally:
    with _lock:
      _partial[path] -= 1
      if not _partial[path]:
        del _partial[path]


@contextlib.contextmanager
def unless_interrupted() -> Iterator[None]:
  """Runs the block (committing an output) only if no signal has arrived; one arriving during it
  is handled after it: an interrupted command commits nothing, and a commit is never cut."""
  with _lock:
    if requested():
      exit_now()
    yield


def exit_now() -> None:
  """Removes the partial outputs, says so in one line and exits (128 + the signal number)."""
  with _lock:
    for path in list(_partial):
      shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):  # (a closed pipe must not stop the exit)
      sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
      print("\nlminf: interrupted", file=sys.stderr, flush=True)
    os._exit(128 + (_signal_number[0] if _signal_number else signal.SIGINT))


def _watch(reader: socket.socket) -> None:
  while True:
    try:
      data = reader.recv(1)
    except OSError:
      return
    if not data:
      return
    if data[0] not in (signal.SIGINT, signal.SIGTERM):
      continue
    if _requested.is_set():  # a second signal: no more waiting
      exit_now()
    _signal_number.append(data[0])
    _requested.set()
    threading.Timer(GRACE, exit_now).start()


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """Takes SIGINT and SIGTERM for the duration of a command (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
  old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  threading.Thread(target=_watch, args=(reader,), daemon=True, name="lminf-interrupt").start()
  try:
    yield
  finally:
    signal.set_wakeup_fd(old_fd)
    for s, handler in previous.items():
      signal.signal(s, handler)
    writer.close()
    reader.close()
