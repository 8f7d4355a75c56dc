"""Exit conventions shared by every script: 0 ok, 2 user error (one line, no traceback), 1 bug."""

from __future__ import annotations

import sys
from typing import Callable

from utils.errors import UsageError


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's `main()` and turn user errors and Ctrl-C into clean exits."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
