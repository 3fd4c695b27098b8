"""bench/exits.py works: it builds its guest and C reference, runs both, and ends
with a `ratio:` line. Speed is the bench's business; nothing here asserts timing."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import needs_kvm

ROOT = Path(__file__).resolve().parents[2]


def quick_run(script: str, *args: str, headline: str) -> list[str]:
    """Run ``bench/script`` with ``args``; its stdout lines, the last ``headline: N`` (N > 0)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(rf"{headline}: \d+\.\d+", lines[-1]), done.stdout
    assert float(lines[-1].split()[1]) > 0
    return lines


@needs_kvm
@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("as", "ld", "gcc")),
                    reason="the bench needs GNU as/ld and gcc")
@pytest.mark.parametrize("ring", [0, 3])
def test_exits_bench_quick_run_prints_a_ratio(ring):
    lines = quick_run("exits.py", "--quick", "--ring", str(ring), headline="ratio")
    assert any(line.startswith("host kind: ") for line in lines)
    assert any(line.startswith("C reference") for line in lines)
    assert any(line.startswith("pykvm") for line in lines)


# --- bench/startup.py, bench/memory.py, bench/guard.py ----------------------------------------
sys.path.insert(0, str(ROOT / "bench"))
import guard  # noqa: E402
import memory as memory_bench  # noqa: E402


@needs_kvm
@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("as", "ld")),
                    reason="the bench needs GNU as/ld")
def test_startup_bench_quick_run_prints_seconds():
    lines = quick_run("startup.py", "--quick", headline="ratio")
    assert any(re.fullmatch(r"seconds: \d+\.\d+", line) for line in lines)
    assert any(line.startswith("reference") for line in lines)
    assert any(line.startswith("flat") for line in lines)


@pytest.mark.parametrize("backing", ["memfd", "anonymous"])
def test_memory_bench_counts_the_guest_ram_mapping_alone(backing):
    """guest_ram_rss() finds pykvm's guest RAM (its memfd, or an anonymous mapping of the
    RAM's exact size) and reads its Rss; everything else is "beyond". Measured against a
    baseline taken first: earlier tests in this process may still hold guest RAM of their
    own (a machine not yet collected), which the name-based match counts too."""
    import mmap
    # Not 8 MiB: every thread stack in this process is an anonymous 8 MiB mapping, and
    # guest_ram_rss() would count one of them as guest RAM.
    size = (8 << 20) + 3 * 4096
    measured_size = size + (4096 if backing == "memfd" else 0)
    before = memory_bench.measure(os.getpid(), measured_size)
    if backing == "memfd":
        fd = os.memfd_create("pykvm-guest-ram")
        os.ftruncate(fd, size)
        region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
    else:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # With transparent huge pages "always", touching 1 MiB of a 2 MiB-aligned
        # anonymous mapping can make all of it resident: count 4 KiB pages only.
        region.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        for offset in range(0, 1 << 20, 4096):
            region[offset] = 1
        resident = memory_bench.measure(os.getpid(), measured_size)
        guest_ram = resident.guest_ram - before.guest_ram
        guest_ram_anonymous = resident.guest_ram_anonymous - before.guest_ram_anonymous
        assert 1024 <= guest_ram < 2048
        assert guest_ram_anonymous == (0 if backing == "memfd" else guest_ram)
        assert resident.beyond == resident.rss - resident.guest_ram > 0
        assert resident.anonymous_beyond + resident.file_backed == resident.beyond
    finally:
        region.close()


RESULTS_TEXT = """
## exits — port-I/O exit round trip

| date | host kind | guest ring | ratio |
|---|---|---|---|
| 2026-11-25 | kvm_pvm | 0 | 1.400 |
| 2026-11-25 | kvm_pvm | 3 | 1.300 |
| 2026-12-06 | kvm_pvm | 0 | 1.200 |
<!-- marker -->

| date | other table | ratio |
|---|---|---|
| 2026-12-07 | 0 | 9.000 |

## startup — process start

| date | flat → first KVM_RUN (ms) | bytecode cache |
|---|---|---|
| 2026-12-06 | 95 | on |
| 2026-12-06 | 140 | off |
"""


def test_guard_takes_the_newest_matching_row_of_the_first_matching_table():
    ring0 = next(h for h in guard.HEADLINES if h.name == "exits-ring0")
    ring3 = next(h for h in guard.HEADLINES if h.name == "exits-ring3")
    startup = next(h for h in guard.HEADLINES if h.name == "startup-flat-s")
    assert guard.recorded(RESULTS_TEXT, ring0) == 1.2
    assert guard.recorded(RESULTS_TEXT, ring3) == 1.3
    assert guard.recorded(RESULTS_TEXT, startup) == 0.095      # recorded in ms, printed in s
    assert guard.recorded("", ring0) is None


def test_guard_marks_more_than_20_percent_worse():
    ring0 = next(h for h in guard.HEADLINES if h.name == "exits-ring0")     # lower is better
    net = next(h for h in guard.HEADLINES if h.name == "net-1500-tx")       # higher is better
    assert guard.verdict(ring0, 1.45, 1.2).startswith("REGRESSED")
    assert guard.verdict(ring0, 1.43, 1.2).startswith("ok")
    assert guard.verdict(ring0, 0.9, 1.2).startswith("ok")
    assert guard.verdict(net, 0.40, 0.5).startswith("REGRESSED")
    assert guard.verdict(net, 0.42, 0.5).startswith("ok")
    assert guard.verdict(net, 0.42, None) == "no recorded row"
