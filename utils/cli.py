"""Exit conventions shared by every script: 0 ok, 2 user error (one line, no traceback), 1 bug."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from utils.errors import UsageError


def run_cli(main: Callable[[], object],
            explain_failure: Optional[Callable[[BaseException], Optional[str]]] = None) -> None:
    """Run a script's `main()` and turn user errors and Ctrl-C into clean exits.

    `explain_failure` turns a RuntimeError it recognises into one line (exit 1) instead of a
    traceback: train.py passes utils.distributed.describe_peer_failure, so losing contact with
    a crashed or hung rank reads as such. Under torchrun every message names the rank.
    """
    try:
        main()
    except UsageError as error:
        print(f"error: {_rank_prefix()}{error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as error:
        message = explain_failure(error) if explain_failure else None
        if message is None:
            raise
        print(f"error: {_rank_prefix()}{message}", file=sys.stderr)
        sys.exit(1)


def _rank_prefix() -> str:
    """"[rank R] " inside a torchrun job of several processes, else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""
