"""Exit conventions shared by every script: 0 ok, 2 user error (one line, no traceback), 1 bug."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from typing import Callable, NoReturn, Optional

from utils.errors import UsageError


def run_cli(main: Callable[[], object],
            explain_failure: Optional[Callable[[BaseException], Optional[str]]] = None,
            skip_teardown: bool = False) -> None:
    """Run a script's `main()` and turn user errors and Ctrl-C into clean exits.

    `explain_failure` turns a RuntimeError it recognises into one line (exit 1) instead of a
    traceback: train.py passes utils.distributed.describe_peer_failure, so losing contact with
    a crashed or hung rank reads as such. Under torchrun every message names the rank.
    `skip_teardown`: the scripts that import torch end through `exit_without_teardown`; left
    off when a test calls run_cli in its own process (it raises SystemExit then).
    """
    code = 0
    try:
        main()
    except UsageError as error:
        print(f"error: {_rank_prefix()}{error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `infer.py ... | head` closed our stdout: stop quietly, as `cat` would
        discard_stdout()  # the final flush must not fail again
        code = 141  # what a shell reports for a command ended by SIGPIPE
    except RuntimeError as error:
        message = describe_worker_death(error) or (explain_failure(error) if explain_failure else None)
        if message is None:
            raise
        print(f"error: {_rank_prefix()}{message}", file=sys.stderr)
        code = 1
    if skip_teardown:
        exit_without_teardown(code)
    if code:
        sys.exit(code)


def discard_stdout() -> None:
    """Point stdout at the null device: its reader went away, and later writes must not fail."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


# torch's words when a DataLoader worker process died: "DataLoader worker (pid 123) is killed by
# signal: Killed.", "... (pid(s) 123, 124) exited unexpectedly", "... exited unexpectedly with exit code 1."
_WORKER_DEATH = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: [^.]+|exited unexpectedly[^.]*)")


def describe_worker_death(error: BaseException) -> Optional[str]:
    """One line with the likely cause when a DataLoader worker process died, else None."""
    found = _WORKER_DEATH.search(str(error))
    if not found:
        return None
    how = found.group(2).replace("is killed by signal: ", "was killed by signal ")
    what = f"a data-loading worker process (pid {found.group(1)}) {how}"
    if how.endswith("Killed"):  # SIGKILL: almost always the kernel's out-of-memory killer
        hint = "the machine probably ran out of memory: use fewer --workers or a smaller --batch_size"
    elif how.endswith("Bus error"):
        hint = "the workers ran out of shared memory (/dev/shm; in Docker raise --shm-size): use fewer --workers"
    else:
        hint = "run again with --workers 0 to see the error in the main process"
    return f"{what}; {hint}"


def exit_without_teardown(code: int) -> NoReturn:
    """End the process now, skipping the interpreter's teardown of every module.

    Once torch, torchvision, torchmetrics and scipy are imported, Python spends 0.5-1.3 s at exit
    freeing their objects one by one (measured on 2 cores, bench/RESULTS.md): a seventh of
    infer.py's run on 900 images. What must happen at exit still does: the script has joined its
    own threads (the checkpoint writer, the decoders) and closed its files; the atexit handlers
    run here (logging flushes its log files, multiprocessing stops DataLoader workers, torchrun's
    process group is left); stdout and stderr are flushed. The normal exit runs instead while
    some other thread is still working (it waits for it), and under a profiler or tracer
    (`python -m cProfile train.py ...` writes its report after the script returns).
    """
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if any(t.is_alive() for t in others) or sys.getprofile() or sys.gettrace():
        sys.exit(code)
    atexit._run_exitfuncs()  # the handlers a normal exit would run
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`infer.py ... | head`)
            stream.flush()
    os._exit(code)


def _rank_prefix() -> str:
    """"[rank R] " inside a torchrun job of several processes, else ""."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""
