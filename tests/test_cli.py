"""utils.cli: the exit every script goes through, run as real processes.

`run_cli(..., skip_teardown=True)` ends with os._exit to skip the interpreter's teardown; these
tests check that nothing a normal exit does is lost on the way: atexit handlers, buffered
output, log files, a thread still writing, the exit codes; and that a closed pipe ends quietly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(tmp_path: Path, body: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body), encoding="utf-8")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, **kwargs)


SCRIPT = """
    import atexit, logging, threading, time
    from pathlib import Path
    from utils.cli import run_cli
    from utils.errors import UsageError

    def main():
        what = sys.argv[1]
        atexit.register(lambda: Path("atexit.txt").write_text("ran"))
        log = logging.getLogger("run")
        log.addHandler(logging.FileHandler("run.log"))
        log.warning("logged")
        print("buffered line")  # stdout is a pipe here: block-buffered, not yet written
        if what == "thread":  # a non-daemon thread still working when main returns
            def late():
                time.sleep(0.5)
                Path("thread.txt").write_text("done")
            threading.Thread(target=late).start()
        if what == "usage":
            raise UsageError("bad flag --x")

    run_cli(main, skip_teardown=True)
"""


def test_skipping_teardown_keeps_output_logs_and_atexit_handlers(tmp_path):
    result = run_script(tmp_path, SCRIPT, "ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "buffered line\n"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "run.log").read_text() == "logged\n"


def test_skipping_teardown_keeps_the_usage_error_exit(tmp_path):
    result = run_script(tmp_path, SCRIPT, "usage")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: bad flag --x"]
    assert result.stdout == "buffered line\n"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_a_thread_still_running_is_waited_for(tmp_path):
    result = run_script(tmp_path, SCRIPT, "thread")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_a_closed_pipe_ends_quietly(tmp_path):
    body = """
        from utils.cli import run_cli

        def main():
            for number in range(1_000_000):
                print(f"line {number}")

        run_cli(main, skip_teardown=True)
    """
    script = tmp_path / "many.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()  # what `| head -1` does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr


def test_a_dead_data_loading_worker_is_named_with_its_likely_cause():
    from utils.cli import describe_worker_death

    said = {
        "DataLoader worker (pid 19076) is killed by signal: Killed. ": "out of memory",
        "DataLoader worker (pid 5) is killed by signal: Bus error. It is possible that dataloader's workers are out "
        "of shared memory. Please try to raise your shared memory limit.": "shared memory",
        "DataLoader worker (pid(s) 12, 13) exited unexpectedly": "--workers 0",
        "DataLoader worker (pid 7) exited unexpectedly with exit code 1. Details are lost due to multiprocessing.":
            "--workers 0",
    }
    for torch_words, cause in said.items():
        line = describe_worker_death(RuntimeError(torch_words))
        assert line.startswith("a data-loading worker process (pid ") and cause in line and "\n" not in line
    assert describe_worker_death(RuntimeError("CUDA out of memory")) is None
