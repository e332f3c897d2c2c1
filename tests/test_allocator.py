"""``benchmarks.core.keep_freed_memory`` (``--keep-freed-memory``): glibc keeps freed blocks for
reuse, so a timed step does not page-fault its activations in afresh; the user's own allocator
settings are left alone."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
ROOT = Path(__file__).resolve().parents[1]

# allocate and touch 256 MB, free it, and print the resident size before and after the free (MB)
PROBE = """
import sys, torch
from benchmarks.core import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
t = torch.ones(64 * 2**20)
held = rss()
del t
print(applied, held, rss())
"""


def _probe(apply: bool, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], env=e, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()
    return out[0] == "True", float(out[1]), float(out[2])


@glibc
def test_freed_blocks_stay_with_the_process_only_when_applied():
    applied, held, after = _probe(True)
    assert applied and after > held - 16  # the 256 MB block stays mapped, ready for reuse
    applied, held, after = _probe(False)
    assert not applied and after < held - 200  # glibc's default: unmapped on free


@glibc
def test_the_users_own_allocator_settings_are_left_alone():
    assert _probe(True, MALLOC_ARENA_MAX="2")[0] is False
    assert _probe(True, LD_PRELOAD="")[0] is True  # an empty LD_PRELOAD preloads nothing
