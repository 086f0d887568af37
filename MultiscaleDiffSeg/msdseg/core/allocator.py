"""Keep freed memory in the process instead of handing it back to the operating system.

Why: a segmentation allocates and frees the same few hundred-megabyte tensors at every network
layer and every diffusion step.  glibc serves blocks that large with ``mmap`` and returns them with
``munmap`` when freed, so each new tensor's pages are faulted in and zeroed by the kernel again:
on two cores that kernel work was a large share of a default run's wall time
(docs/benchmarks.md).  With ``mmap`` switched off and a high trim threshold, freed blocks stay in
the heap and the next tensor of the same size reuses them.

Only for processes msdseg owns from start to end (the ``msdseg`` command, its pool and web
workers, benchmark children): memory then goes back to the system when the process exits, not
before, which a long-lived host such as Slicer's GUI process should not be made to accept.  A no-op
where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of unmapping them; True when it agreed."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return _applied
