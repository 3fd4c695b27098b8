"""Warm start (issue #21): `pykvm run -- CMD` boots the first time, restores after.

Four cold boots in two rounds of two at once (a boot costs minutes on kvm_pvm):

1. two concurrent first runs of one configuration, into an empty cache: both give
   the command's output and status, and the cache ends with ONE valid entry;
2. two later runs restore that entry (its last-use time moves, no entry is added):
   same output shape and status, different random bytes (the pool was reseeded),
   the clock within seconds of the host's;
3. at once, on two copies of that entry with its memory damaged: ``--cold`` leaves
   its copy untouched and boots; a plain run says in one line that it dropped the
   entry, boots cold and caches a new one.

The cache's own bookkeeping (listing, LRU eviction, clearing, which runs may use it)
is tested without a guest, on entries made of plain files.

Every run uses a cache of its own under tmp_path (PYKVM_CACHE); the default guest,
which lives in the user's cache, is named by PYKVM_GUEST_DIR. The runs import a copy
of the pykvm package taken when the module starts: the cache key covers pykvm's own
source, so an edit to the working tree during the minutes of a boot would (rightly)
make the next run miss the entry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm.machine import default_guest_dir

COMMAND = "head -c 16 /dev/urandom | od -An -tx1; date +%s; echo warm-stderr >&2; exit 4"
RUN_TIMEOUT = 3600        # a cold boot took over 30 min at load 15 on 2 CPUs (kvm_pvm)
CLOCK_SLACK = 5.0
HEX_LINE = re.compile(r"^( [0-9a-f]{2}){16}$")


class Run:
    """One `pykvm run -- sh -c COMMAND` in a process of its own, of the pykvm copy in
    ``source``."""

    def __init__(self, source: Path, cache: Path, *options: str):
        self.cache = cache
        self.before = time.time()
        env = dict(os.environ, PYKVM_CACHE=str(cache), PYKVM_GUEST_DIR=str(GUEST),
                   PYTHONPATH=str(source))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "run", *options, "--", "sh", "-c", COMMAND],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=source)

    def finish(self) -> "Run":
        self.stdout, self.stderr = self.process.communicate(timeout=RUN_TIMEOUT)
        self.after = time.time()
        self.status = self.process.returncode
        return self

    @property
    def random(self) -> str:
        return self.stdout.splitlines()[0]

    @property
    def clock(self) -> int:
        return int(self.stdout.splitlines()[1])

    def check_output(self) -> None:
        """What every run prints, cold or restored: the command's output, exactly."""
        assert self.status == 4, self.stderr[-3000:]
        lines = self.stdout.splitlines()
        assert len(lines) == 2 and HEX_LINE.match(lines[0]) and lines[1].isdigit(), self.stdout
        assert self.stderr == "warm-stderr\n"


GUEST = default_guest_dir()


def entries(cache: Path) -> list[Path]:
    boots = cache / "boots"
    return sorted(p for p in boots.iterdir() if not p.name.startswith(".")) \
        if boots.is_dir() else []


def listing(directory: Path) -> dict:
    """Every file under ``directory`` with its size and mtime (what "untouched" means)."""
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the pykvm package as it is now (see the module docstring)."""
    if GUEST is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    import pykvm

    copy = tmp_path_factory.mktemp("source")
    shutil.copytree(Path(pykvm.__file__).parent, copy / "pykvm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture(scope="module")
def first_runs(source, tmp_path_factory):
    cache = tmp_path_factory.mktemp("warm") / "cache"
    runs = [Run(source, cache), Run(source, cache)]    # two first runs at once
    return cache, [run.finish() for run in runs]


@pytest.fixture(scope="module")
def restored_runs(source, first_runs):
    cache, _ = first_runs
    entry, = entries(cache)
    old = time.time() - 3600
    os.utime(entry, (old, old))
    runs = [Run(source, cache).finish(), Run(source, cache).finish()]
    return entry, old, runs


@pytest.fixture(scope="module")
def damaged_runs(source, restored_runs, tmp_path_factory):
    """--cold and a plain run at once, each on its own copy of a damaged entry."""
    entry = restored_runs[0]
    caches = []
    for name in ("cold", "fallback"):
        cache = tmp_path_factory.mktemp(name) / "cache"
        copy = cache / "boots" / entry.name
        shutil.copytree(entry, copy)
        with open(copy / "memory.bin", "r+b") as memory:   # damage the guest's RAM
            memory.seek(1 << 20)
            memory.write(b"\xde\xad\xbe\xef" * 1024)
        caches.append(cache)
    cold_before = listing(caches[0])
    runs = [Run(source, caches[0], "--cold"), Run(source, caches[1])]
    return caches, cold_before, [run.finish() for run in runs]


@pytest.mark.linux
def test_concurrent_first_runs_print_the_command_output_and_leave_one_entry(first_runs):
    cache, runs = first_runs
    for run in runs:
        run.check_output()
    entry, = entries(cache)
    assert (entry / "state.json").is_file() and (entry / "memory.bin").is_file()
    assert (entry / "entry.json").is_file()
    # no scratch directory of the losing run was left behind
    assert sorted(p.name for p in (cache / "boots").iterdir() if p.name.startswith(".")) == \
        [".digests.json", ".lock"]


@pytest.mark.linux
def test_later_runs_restore_the_entry(restored_runs):
    entry, old, runs = restored_runs
    for run in runs:
        run.check_output()
    assert entries(entry.parent.parent) == [entry]          # restored, not booted again
    assert entry.stat().st_mtime > old + 1800               # its last use moved


@pytest.mark.linux
def test_restored_runs_read_fresh_random_bytes(restored_runs, first_runs):
    runs = restored_runs[2]
    assert runs[0].random != runs[1].random
    assert len({run.random for run in runs + first_runs[1]}) == 4


@pytest.mark.linux
def test_restored_clock_is_the_hosts(restored_runs):
    for run in restored_runs[2]:
        assert run.before - CLOCK_SLACK <= run.clock <= run.after + CLOCK_SLACK, \
            (run.before, run.clock, run.after)


@pytest.mark.linux
def test_a_damaged_entry_is_dropped_and_the_run_boots_cold(damaged_runs, restored_runs):
    caches, _, (_, fallback) = damaged_runs
    assert fallback.status == 4, fallback.stderr[-3000:]
    notice, rest = fallback.stderr.split("\n", 1)
    assert notice.startswith("pykvm: the cached boot ") and "removed it, booting cold" in notice
    assert "checksum" in notice, notice
    assert rest == "warm-stderr\n"
    entry, = entries(caches[1])                  # a new, valid entry under the same key
    assert entry.name == restored_runs[0].name
    assert (entry / "memory.bin").read_bytes() != b""
    assert (entry / "memory.bin").stat().st_mtime > fallback.before


@pytest.mark.linux
def test_cold_never_reads_or_writes_the_cache(damaged_runs):
    caches, cold_before, (cold, _) = damaged_runs
    cold.check_output()                          # no line about the damaged entry
    assert listing(caches[0]) == cold_before


# --- without a guest --------------------------------------------------------------------------
def fake_entry(root: Path, key: str, size: int, last_used: float, mem: int = 512 << 20) -> Path:
    """An entry as the cache sees one: state.json, a memory.bin of ``size`` bytes of
    data, entry.json; last used at ``last_used``."""
    import json

    entry = root / key
    entry.mkdir(parents=True)
    (entry / "state.json").write_text("{}")
    (entry / "memory.bin").write_bytes(b"\1" * size)
    (entry / "entry.json").write_text(json.dumps({"created": last_used - 60, "pykvm_version": "9",
                                                  "config": {"kernel": "/g/vmlinux", "mem": mem,
                                                             "cpus": 2, "append": "quiet"}}))
    os.utime(entry, (last_used, last_used))
    return entry


def test_eviction_removes_the_least_recently_used_past_the_cap(tmp_path):
    from pykvm.warm.cache import BootCache

    root = tmp_path / "boots"
    now = time.time()
    old = fake_entry(root, "a" * 24, 1 << 20, now - 300)
    newer = fake_entry(root, "b" * 24, 1 << 20, now - 200)
    newest = fake_entry(root, "c" * 24, 1 << 20, now - 100)
    (root / ".c-scratch").mkdir()                       # another run's, fresh: kept
    cache = BootCache(root, cap=(2 << 20) + (64 << 10))
    assert cache.evict(keep=old) == [newer]             # the kept one stays, even if oldest
    assert [e.path for e in cache.entries()] == [newest, old]
    assert (root / ".c-scratch").is_dir()


def test_cache_list_and_clear(tmp_path):
    root = tmp_path / "cache" / "boots"
    fake_entry(root, "d" * 24, 3 << 20, time.time() - 7200, mem=256 << 20)
    env = dict(os.environ, PYKVM_CACHE=str(tmp_path / "cache"), PYKVM_BOOT_CACHE_MAX="1G")
    listed = subprocess.run([sys.executable, "-m", "pykvm", "cache", "list"], env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    line, total = listed.stdout.splitlines()
    assert line.startswith("d" * 24) and "3.0 MiB" in line and "used 2h ago" in line
    assert "vmlinux, 256 MiB, 2 vCPU, append='quiet' (pykvm 9)" in line
    assert total == f"1 cached boot(s), 3.0 MiB of 1024 MiB in {root}"
    cleared = subprocess.run([sys.executable, "-m", "pykvm", "cache", "clear"], env=env,
                             capture_output=True, text=True)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 cached boot(s)")
    assert [p.name for p in root.iterdir()] == [".lock"]


def test_a_cache_directory_others_can_write_is_refused(tmp_path):
    from pykvm.errors import BootCacheError
    from pykvm.warm.cache import BootCache

    root = tmp_path / "boots"
    root.mkdir(mode=0o700)
    root.chmod(0o777)
    with pytest.raises(BootCacheError, match="writable by no one else"):
        BootCache(root).evict()


@pytest.mark.parametrize("options, reason", [
    (["--disk", "/dev/null"], "a --disk is attached"),
    (["--stats"], "--stats watches the boot itself"),
    (["--initrd", "/dev/null"], "only the default guest's initramfs"),
    (["--kernel", "/dev/null"], "only the default guest's kernel"),
    (["--no-extract"], "does not key over extract_kernel"),
])
def test_runs_that_cannot_use_the_cache_say_why(options, reason, monkeypatch):
    from pykvm.cli import build_parser
    from pykvm.machine import MachineConfig
    from pykvm.warm.run import refusal

    if GUEST is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    monkeypatch.setenv("PYKVM_GUEST_DIR", str(GUEST))      # as the module saw it
    args = build_parser().parse_args(["run", *options])
    config = MachineConfig(kernel=Path(args.kernel or GUEST / "vmlinux"),
                           initrd=Path(args.initrd or GUEST / "initramfs.cpio"),
                           disks=list(args.disk), extract_kernel=not args.no_extract)
    assert reason in refusal(args, config)
    plain = build_parser().parse_args(["run"])
    assert refusal(plain, MachineConfig(kernel=GUEST / "vmlinux",
                                        initrd=GUEST / "initramfs.cpio")) is None


def test_a_setting_the_cache_does_not_key_over_is_not_cached(monkeypatch):
    """A MachineConfig field the GuestSpec does not carry (here --rootfs) makes the
    run boot the old way instead of running in a guest without it."""
    from pykvm.cli import build_parser
    from pykvm.machine import MachineConfig
    from pykvm.warm.run import refusal

    if GUEST is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    monkeypatch.setenv("PYKVM_GUEST_DIR", str(GUEST))
    config = MachineConfig(kernel=GUEST / "vmlinux", initrd=GUEST / "initramfs.cpio",
                           rootfs="/srv")
    assert refusal(build_parser().parse_args(["run"]), config) == \
        "the boot cache does not key over rootfs"


def test_the_key_remembers_file_digests_until_a_file_changes(tmp_path, monkeypatch):
    """pykvm/warm/digests.py: a file's digest is reused while its device, inode, size,
    mtime and ctime stay; a rewrite with the same size and a faked mtime still moves its
    ctime, so the key follows the content. Files changed in the last RACY_SECONDS, and a
    damaged memo, are not trusted."""
    import json

    from pykvm.warm import digests
    from pykvm.warm.cache import BootCache
    from pykvm.warm.guest import GuestSpec

    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"k" * 4096)
    initrd.write_bytes(b"i" * 100)
    old = time.time() - 60
    for path in (kernel, initrd):
        os.utime(path, (old, old))
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)      # (ctimes are seconds old here)
    cache = BootCache(tmp_path / "boots")
    spec = GuestSpec(kernel=str(kernel), initrd=str(initrd), append="", mem=1 << 27, cpus=1)
    key = spec.key("/dev/kvm", cache.digest_memo())
    assert key == spec.key("/dev/kvm")                      # the memo never changes a key
    memo = json.loads((cache.root / digests.MEMO_NAME).read_text())
    assert memo[str(kernel)][-1] == digests.hash_file(str(kernel))[0]

    hashed = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda path: hashed.append(path) or real(path))
    assert spec.key("/dev/kvm", cache.digest_memo()) == key and hashed == []
    kernel.write_bytes(b"K" * 4096)                         # same size, same mtime ...
    os.utime(kernel, (old, old))
    changed = spec.key("/dev/kvm", cache.digest_memo())     # ... but the ctime moved
    assert changed != key and hashed == [str(kernel)]
    assert changed == spec.key("/dev/kvm")

    (cache.root / digests.MEMO_NAME).write_text("{not json")
    assert spec.key("/dev/kvm", cache.digest_memo()) == changed
    monkeypatch.setattr(digests, "RACY_SECONDS", 3600.0)
    (cache.root / digests.MEMO_NAME).unlink()
    assert spec.key("/dev/kvm", cache.digest_memo()) == changed
    assert not (cache.root / digests.MEMO_NAME).exists()     # too recent to remember
