"""Errors of bad user input (one line each, no traceback), and the noise that must not follow them."""


class UserError(ValueError):
  """Bad input (missing file, wrong shape, unknown option, ...): a one-line message, no traceback."""


class UserCodeError(UserError):
  """An exception raised by a user's own code (an attention method's module or class): one line
  naming where and the exception's first line. `LMINF_TRACEBACK=1` shows its traceback too."""

  def __init__(self, where: str, error: BaseException):
    first = (str(error).strip().splitlines() or [""])[0]
    super().__init__(f"{where}: {type(error).__name__}" + (f": {first}" if first else "") +
                     " (LMINF_TRACEBACK=1 shows the traceback)")
    self.error = error


def without_closed_loop_reports(previous):
  """`previous` (an unraisable hook) without the reports of reads into a closed event loop.

  Orbax reads the arrays concurrently (asyncio.gather over tensorstore futures) in an event loop
  that it closes as soon as one read fails. The reads still in flight then complete into the
  closed loop, and tensorstore reports each `RuntimeError: Event loop is closed` through
  sys.unraisablehook: tracebacks around the error line, at random, until the process exits. A
  failed save does the same."""
  if getattr(previous, "ignores_closed_loop", False):
    return previous

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.ignores_closed_loop = True
  return hook
