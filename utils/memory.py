"""Make glibc's malloc keep the memory a forward pass frees, for the next batch to reuse.

Why: by default glibc hands every large block (an activation of a batch of images: tens of MB)
back to the kernel when torch frees it, and takes it back from the kernel for the next batch,
where every 4 KB page is faulted in and zeroed again. Measured on 2 cores (bench/RESULTS.md):
mobilenet_v3_small at 224 px, batch 64, spent more time in page faults than in convolutions
(1.4 million faults in a 150-image run); with these settings the same forward pass ran about
2x faster. PyTorch's CPU tuning guides get the same effect by preloading jemalloc or tcmalloc;
this needs no install. Other C libraries (macOS, Windows, musl) are left as they are.

The settings only change what happens to freed memory: it stays in the process for reuse,
up to TRIM_THRESHOLD above what is in use, instead of returning to the system at once. The
peak a run needs is unchanged; what it holds after a peak can be that much larger.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap, not from mmap: glibc's largest allowed value
TOP_PAD = 256 << 20  # the heap grows by this much at once, in fewer and larger steps
TRIM_THRESHOLD = 512 << 20  # free memory kept at the top of the heap before any goes back to the system


def user_tuned_malloc() -> bool:
    """Whether the user set glibc's malloc through its own environment variables: then theirs stand."""
    return any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ) or \
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Apply the settings above when the C library is glibc and the user has not tuned malloc
    themselves (MALLOC_TRIM_THRESHOLD_ and the like, or GLIBC_TUNABLES); returns whether it did.

    Called first thing by the scripts that run models (train.py, infer.py, runui.py,
    export.py, audit_dataset.py), never on import: it changes the whole process.
    """
    if not sys.platform.startswith("linux") or user_tuned_malloc():
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter is linked against
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl's mallopt does nothing
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TOP_PAD, TOP_PAD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def let_waiting_threads_sleep() -> None:
    """Before torch loads OpenMP: its threads sleep while they wait instead of spinning.

    For the scripts where other threads share the cores with the forward pass: runui.py (the
    window's thread, docs/viewer.md "Responsiveness") and infer.py (the decode threads). A spinning
    OpenMP thread holds a core that the decoding needs. Measured on 2 cores (bench/RESULTS.md):
    infer.py predicted 600 photos in 1.79 s against 1.93 s (medians of 5 alternated runs), the
    same on small JPEGs; training, whose decoding runs in other processes, ran 5% slower, so
    train.py leaves the default. A value the user set stands.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
