"""bench/exits.py works: it builds its guest and C reference, runs both, and ends
with a `ratio:` line. Speed is the bench's business; nothing here asserts timing."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_kvm

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "exits.py"


@needs_kvm
@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("as", "ld", "gcc")),
                    reason="the bench needs GNU as/ld and gcc")
@pytest.mark.parametrize("ring", [0, 3])
def test_exits_bench_quick_run_prints_a_ratio(ring):
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--ring", str(ring)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: \d+\.\d+", lines[-1]), done.stdout
    assert float(lines[-1].split()[1]) > 0
    assert any(line.startswith("host kind: ") for line in lines)
    assert any(line.startswith("C reference") for line in lines)
    assert any(line.startswith("pykvm") for line in lines)
