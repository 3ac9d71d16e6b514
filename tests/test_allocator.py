"""``retain_freed_memory``: freed tensor memory is reused without page faults (glibc only)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's; other C libraries are left alone"
)

# A step's worth of activations: twelve 8 MiB tensors and three others, written, then all freed; six
# steps. The page faults of each step are reported (a fresh process each, the thresholds being global).
STEPS = """
import json, resource, sys, torch
if sys.argv[1] == "retain":
    from ctxlab.allocator import retain_freed_memory
    assert retain_freed_memory()
faults = []
for _ in range(6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mib * 1024 * 256) for mib in [8] * 12 + [24, 12, 4]]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps(faults))
"""
PAGES_PER_STEP = (8 * 12 + 24 + 12 + 4) * 256  # 4 KiB pages written per step


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_retained_memory_is_reused_without_page_faults():
    retained, default = _faults("retain"), _faults("default")
    # the control: under glibc's defaults the first step's blocks are mapped and unmapped, and the
    # second step faults its pages in again from a growing heap (what happens after that varies
    # from run to run: glibc trims the heap top on a heuristic)
    assert default[1] > PAGES_PER_STEP // 2, default
    # retained: from the second step on, the freed blocks serve the next steps
    assert max(retained[1:]) < PAGES_PER_STEP // 10, retained
