"""Outputs written atomically: nothing half-written survives an error, a full disk or Ctrl-C.

An output is written under a temporary sibling name, `.NAME.partial-PID[.suffix]`, and renamed
onto NAME only when complete. On an error the temporary is removed; on Ctrl-C `interrupt`
removes it; after a kill (SIGKILL, a power cut) the next write of the same NAME removes the
temporaries whose process is gone, and says so. Output paths are checked before any work
starts, so a bad one costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lminf_jax.util import interrupt
from lminf_jax.errors import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def partial_path(path: Path) -> Path:
  """The temporary sibling of `path` for this process, after removing stale ones of dead processes."""
  pattern = re.compile(rf"\.{re.escape(path.name)}\.partial-(\d+)(\..*)?")
  if path.parent.is_dir():
    for stale in path.parent.iterdir():
      if (match := pattern.fullmatch(stale.name)) and int(match.group(1)) != os.getpid() and not _alive(
          int(match.group(1))):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        print(f"lminf: removed {stale}, left by an interrupted run (process {match.group(1)})", file=sys.stderr)
  return path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")


def check_output_file(path: Path, suffix: str | None = None) -> Path:
  """Refuses an output file path that cannot be written, before any work is done."""
  path = Path(path)
  if path.is_dir():
    raise UserError(f"output {path} is a directory")
  if suffix is not None and path.suffix != suffix:
    raise UserError(f"output {path} must end in {suffix}")
  _check_parent(path)
  return path


def check_output_dir(path: Path, exist_ok: bool = False) -> Path:
  """Refuses an output dir path that exists (unless `exist_ok`), is a file, or cannot be created."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"output {path} is a file, not a directory")
  if path.exists() and not exist_ok:
    raise UserError(f"output {path} already exists")
  if path.is_dir():
    if not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
      raise UserError(f"output directory {path} is not writable")
    return path
  _check_parent(path, create=True)
  return path


def _check_parent(path: Path, create: bool = False) -> None:
  parent = path.absolute().parent
  if create:  # an output dir's missing parents are made, as `mkdir -p` would
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
  if not parent.is_dir():
    raise UserError(f"output directory {parent} does not exist")
  if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
    raise UserError(f"output directory {parent} is not writable")
  try:  # (access() trusts the mode bits: root passes it where a file system still refuses, e.g. /sys)
    fd, probe = tempfile.mkstemp(dir=parent, prefix=".lminf-probe-")
  except OSError as e:
    raise UserError(f"output directory {parent} is not writable ({e.strerror})") from None
  os.close(fd)
  os.unlink(probe)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
  """Yields a temporary sibling path to write; renames it onto `path` if the block succeeds."""
  path = check_output_file(path)
  tmp = partial_path(path)
  with interrupt.partial(tmp), _naming_a_full_disk(path):
    try:
      yield tmp
      _commit(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
  """Yields a new temporary sibling dir to fill; renames it onto `path` (which must not exist)
  if the block succeeds. The dir gets the usual permissions (the umask's), not mkdtemp's 0700."""
  path = check_output_dir(Path(path).absolute())
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = partial_path(path)
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  with interrupt.partial(tmp), _naming_a_full_disk(path):
    try:
      yield tmp
      try:
        _commit(tmp, path)
      except OSError:
        if path.exists():  # another run finished first
          raise UserError(f"output {path} already exists") from None
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, path: Path) -> None:
  """Renames `tmp` onto `path`, unless Ctrl-C arrived: an interrupted command commits nothing."""
  with interrupt.unless_interrupted():
    os.replace(tmp, path)


@contextlib.contextmanager
def _naming_a_full_disk(path: Path) -> Iterator[None]:
  try:
    yield
  except Exception as e:
    if disk_full(e):
      raise UserError(f"no space left on device while writing {path}") from None
    raise


def disk_full(error: BaseException) -> bool:
  """Whether `error`, or one it was raised from, says the disk (or quota) is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return True
    if any(s in str(error) for s in ("No space left on device", "Disk quota exceeded")):
      return True
    error = error.__cause__ or error.__context__
  return False
