"""utils.memory.keep_freed_memory: a forward pass stops paying page faults for memory it just freed.

Counted, not timed: minor page faults (each a 4 KB page the kernel hands over and zeroes) over
five forward passes of a small conv net, in fresh processes with and without the setting.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FORWARD_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: count 4 KB pages, whatever huge pages are free
    sys.path.insert(0, sys.argv[2])
    import torch
    from utils.memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    if sys.argv[1] == "user_tuned":
        assert not keep_freed_memory()
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
    images = torch.rand(8, 3, 112, 112)  # activations of 6.4 MB, as a batch of photos has
    with torch.inference_mode():
        net(images)  # the first pass may fault: the memory is new
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            net(images)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def forward_faults(mode: str, env: dict | None = None) -> float:
    result = subprocess.run([sys.executable, "-c", FORWARD_FAULTS, mode, str(REPO)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


def glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc(), reason="the setting is glibc's; other C libraries are left as they are")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    default, kept = forward_faults("default"), forward_faults("keep")
    # measured: about 7,000 faults per pass by default (the activations, every time), about 300 kept. With
    # transparent huge pages on ("always"), one fault can bring 2 MB: 935 was seen once under load.
    assert default > 1000
    assert kept < default / 4, (default, kept)



@pytest.mark.skipif(not glibc(), reason="the setting is glibc's; other C libraries are left as they are")
def test_a_user_setting_of_glibc_malloc_is_left_alone():
    import os

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}  # glibc's default value, set by hand
    assert forward_faults("user_tuned", env) > 1000  # keep_freed_memory refused; the faults stay


@pytest.mark.parametrize("script", ["infer.py", "runui.py"])
def test_the_predicting_scripts_let_waiting_openmp_threads_sleep_unless_the_user_chose(script, tmp_path):
    """infer.py and the viewer set OMP_WAIT_POLICY=PASSIVE before torch loads; a user's value stands."""
    import os

    probe = tmp_path / "probe.py"  # runs the script's __main__ block with run_cli replaced by a report
    probe.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        sys.path.insert(0, {str(REPO)!r})
        import utils.cli
        utils.cli.run_cli = lambda *args, **kwargs: print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
        runpy.run_path({str(REPO / script)!r}, run_name="__main__")
    """), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    ran = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=120)
    assert ran.stdout.split() == ["PASSIVE", "False"], ran.stderr  # set, and torch not loaded yet
    ran = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert ran.stdout.split()[0] == "ACTIVE", ran.stderr
