"""The one exception type for bad user input: the CLI prints its message as one line."""


class UserError(ValueError):
  """Bad input (missing file, wrong shape, unknown option, ...): a one-line message, no traceback."""
