"""Errors that mean "the user gave us something wrong", not "we have a bug".

Command-line entry points catch `LongLoraError`, print its message on one line
and exit with status 2; everything else is a bug and keeps its traceback.
"""


class LongLoraError(Exception):
  """A problem with the user's input; the message names the fix."""


class CheckpointError(LongLoraError):
  """A checkpoint (directory, config.json or weights file) cannot be used."""
