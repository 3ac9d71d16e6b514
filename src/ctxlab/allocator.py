"""Keep freed host memory in the process for reuse, instead of handing it back to the OS every step.

PyTorch allocates CPU tensors with ``posix_memalign`` and no caching allocator in between, so the C
library decides what a freed tensor's memory becomes. glibc (mallopt(3)) serves blocks above a
threshold with their own ``mmap`` and unmaps them on ``free``, and gives the top of its heap back to
the OS once more than ``M_TRIM_THRESHOLD`` of it is free. Both thresholds start low and move with a
heuristic. A training step allocates its saved activations in the forward and frees them all in the
backward; when the heuristic decides to return them, the next step takes a page fault on every
4 KiB page it writes. Measured on this machine (2026-12-03, 6 layers x 512 wide, batch 4 x 256,
compiled): the model with 4 mHC residual streams, whose saved stream tensors are 8 MiB each, faulted
15,000-27,000 pages in every forward and ~8,000 in every backward, the plain model 0-8,000 per step,
and a first write of 96 MiB took ~22 ms against ~4 ms for the same pages warm. With
:func:`retain_freed_memory` neither faults; the step times moved within this machine's noise (~20 ms of
a 1.3-1.6 s step; ``benchmarks/mhc_overhead.py --allocator``, docs/benchmarks.md).

This is the same remedy as linking jemalloc or tcmalloc, which PyTorch's CPU performance guide
recommends, done with the C library already loaded. The price is that the process keeps its peak
heap (memory freed by tensors is reused, not returned): right for a training or benchmark process,
which is why ``ctxlab`` applies it in ``train()`` (and ``benchmarks/mhc_overhead.py``), not on import.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused
TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int: trim only once 2 GiB at the heap top are free


def retain_freed_memory() -> bool:
    """Pin glibc's mmap threshold at its maximum (32 MiB: smaller blocks come from the heap) and trim the heap
    only above 2 GiB of free top, so freed memory is reused by the next allocations without page faults.

    Returns True when applied; False (and nothing changed) under any other C library (macOS, Windows,
    musl), whose allocators have their own policies. Blocks above 32 MiB are still mapped and unmapped."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX))
