#!/usr/bin/env python3
"""`make bench`: every bench, quickly, each headline beside its last recorded row.

Each bench prints its headline as a line ``ratio: X``, ``seconds: X`` or ``mib: X``
(its last, but start-up prints two). This script runs each in a short mode, reads the headline, finds the
newest row of the same measurement in bench/RESULTS.md, and prints them side by side
with the goal (issue #13). A headline more than 20 % worse than its recorded row is
marked REGRESSED and makes the exit status 1 (as does a bench that fails to run).
Short runs are noisier than recorded ones, and figures move with the host's load:
re-run a flagged bench in full before believing it, and compare only on a quiet host.

    python3 bench/guard.py                      # the fast benches (~2-3 minutes)
    python3 bench/guard.py --snapshot DIR       # also restore DIR (bench/snapshot.py --keep DIR)
    python3 bench/guard.py --linux              # also the memory bench (boots Linux, ~1-2 min)
    python3 bench/guard.py --only exits-ring0   # one headline (names below)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
TOLERANCE = 0.20    # worse than recorded by more than this fraction: REGRESSED


@dataclass(frozen=True)
class Headline:
    """One bench's headline figure and where RESULTS.md records it."""

    name: str
    argv: tuple[str, ...]          # the bench and its short-mode options
    key: str                       # the headline line's key: "ratio", "seconds", "mib"
    section: str                   # RESULTS.md heading the table is under ("## exits")
    column: str                    # the table column holding the recorded figure
    goal: float | None             # issue #13's goal, None where it set none
    lower_is_better: bool
    where: dict[str, str] = field(default_factory=dict)   # column -> value the row must have
    scale: float = 1.0             # recorded value ÷ headline value (ms recorded, s printed)
    pattern: str = r"[-+]?\d+(?:\.\d+)?"   # the figure in the cell: its group 1 if it has one
    needs: str | None = None       # "linux" or "snapshot": run only when asked
    compare: bool = True           # False: seconds that follow the host's load; shown for the
                                   # goal, never marked (its ratio headline is the guard)
    timeout: float = 300.0


HEADLINES = (
    Headline("exits-ring0", ("exits.py", "--exits", "10000", "--rounds", "5"), "ratio",
             "## exits", "ratio", 1.15, True, {"guest ring": "0"}),
    Headline("exits-ring3", ("exits.py", "--exits", "4000", "--rounds", "5", "--ring", "3"),
             "ratio", "## exits", "ratio", 1.15, True, {"guest ring": "3"}),
    Headline("startup-flat", ("startup.py", "--quick"), "ratio", "## startup", "flat ÷ python",
             None, True, {"bytecode cache": "on"}),
    Headline("startup-flat-s", ("startup.py", "--quick"), "seconds", "## startup",
             "flat → first KVM_RUN (ms)", 0.10, True, {"bytecode cache": "on"}, scale=1000,
             compare=False),
    Headline("blk-seq-read-qd32", ("blk.py", "--quick"), "ratio", "## blk", "pykvm/host", 0.90,
             False, {"case": "seq read 1 MiB", "QD": "32"}),
    Headline("net-1500-tx", ("net.py", "--quick"), "ratio", "## net", "tx/veth", 0.70, False,
             {"frame (B)": "1500"}),
    Headline("completions-ldmxcsr", ("completions.py", "--quick"), "ratio", "## completions",
             "ldmxcsr µs (ratio)", None, True, pattern=r"\(([\d.]+)\)"),
    Headline("snapshot-restore", ("snapshot.py", "--quick", "--snapshot", "{snapshot}"),
             "seconds", "## snapshot", "restore → answer", 0.15, True, needs="snapshot",
             compare=False),
    Headline("memory", ("memory.py", "--quick"), "mib", "## memory",
             "beyond guest RAM (MiB)", 30, True, {"when": "boot +5 s"}, needs="linux",
             timeout=600),
)


def recorded(text: str, headline: Headline) -> float | None:
    """The headline's figure in the newest matching row of its RESULTS.md table."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(headline.section))
    except StopIteration:
        return None
    header = None
    value = None
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            header = None       # a table ended; the next one has its own header
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set(line) <= set("|-: "):
            continue
        row = dict(zip(header, cells))
        if headline.column in row and all(row.get(k) == v for k, v in headline.where.items()):
            number = re.search(headline.pattern, row[headline.column].replace(",", ""))
            if number:
                value = float(number.group(number.lastindex or 0)) / headline.scale
    return value


_runs: dict[tuple[str, ...], subprocess.CompletedProcess | None] = {}


def run(headline: Headline, snapshot: Path | None) -> tuple[float | None, str]:
    """The headline's figure (the last ``key: N`` line of its bench's output), or None and
    why. Headlines of the same bench and options share one run."""
    argv = (sys.executable, str(BENCH / headline.argv[0]),
            *(a.format(snapshot=snapshot) for a in headline.argv[1:]))
    if argv not in _runs:
        try:
            _runs[argv] = subprocess.run(argv, capture_output=True, text=True,
                                         timeout=headline.timeout)
        except subprocess.TimeoutExpired:
            _runs[argv] = None
    done = _runs[argv]
    if done is None:
        return None, f"timed out after {headline.timeout:.0f} s"
    lines = [line.strip() for line in done.stdout.splitlines()
             if line.startswith(f"{headline.key}: ")]
    found = re.fullmatch(rf"{headline.key}: ([-+]?\d+(\.\d+)?)", lines[-1]) if lines else None
    if done.returncode != 0 or not found:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed (status {done.returncode}): {why}"
    return float(found.group(1)), ""


def verdict(headline: Headline, now: float, then: float | None) -> str:
    if then is None or then == 0:
        return "no recorded row"
    if not headline.compare:
        return "not compared (follows the load)"
    change = now / then - 1 if headline.lower_is_better else then / now - 1
    if change > TOLERANCE:
        return f"REGRESSED ({change:.0%} worse than recorded)"
    if abs(change) < 0.005:
        return "ok"
    return f"ok ({abs(change):.0%} {'worse' if change > 0 else 'better'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux", action="store_true", help="also the benches that boot Linux")
    parser.add_argument("--snapshot", type=Path, metavar="DIR",
                        help="also time restores of this snapshot (taken at the shell)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"only these headlines ({', '.join(h.name for h in HEADLINES)})")
    args = parser.parse_args(argv)
    asked = {"linux": args.linux, "snapshot": args.snapshot is not None}
    wanted = [h for h in HEADLINES if (args.only is None or h.name in args.only)
              and (h.needs is None or asked[h.needs])]
    if not wanted:
        parser.error("nothing to run")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    print(f"bench guard: {len(wanted)} headline(s), load average {os.getloadavg()[0]:.2f} "
          f"(2-CPU hosts: compare on a quiet one)", flush=True)
    print(f"{'headline':<20}{'now':>9}{'recorded':>10}{'goal':>8}  verdict", flush=True)
    bad = 0
    for headline in wanted:
        started = time.monotonic()
        now, error = run(headline, args.snapshot)
        then = recorded(text, headline)
        goal = "—" if headline.goal is None else \
            f"{'<=' if headline.lower_is_better else '>='}{headline.goal:g}"
        if now is None:
            bad += 1
            print(f"{headline.name:<20}{'—':>9}{_fmt(then):>10}{goal:>8}  {error}", flush=True)
            continue
        judged = verdict(headline, now, then)
        bad += judged.startswith("REGRESSED")
        if headline.goal is None:
            met = ""
        else:
            met = (now <= headline.goal) if headline.lower_is_better else (now >= headline.goal)
            met = f"; goal {'met' if met else 'not met'}"
        print(f"{headline.name:<20}{now:>9.3f}{_fmt(then):>10}{goal:>8}  {judged}{met} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    return 1 if bad else 0


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
