"""Shared behaviour of the `python -m train.*` / `python -m eval.*` commands."""

import sys
from typing import Callable

from longlora_jax.errors import LongLoraError


def run(main: Callable[[], int | None]) -> None:
  """Runs `main`; a user error becomes one line on stderr and exit code 2."""
  try:
    code = main()
  except LongLoraError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
