"""The default guest's builder and cache as `pykvm guest` uses them (pykvm/guestimage):
which build counts as the guest, what `clean` removes, the one-line answers when it
cannot build or find one, and progress during a long build step. No kernel is built
here: caches are made by hand in temporary directories (the real one is only read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.errors import GuestBuildError
from pykvm.guestimage import build, cache, host

CUSTOM = {build.SOURCE_PACKAGE: "custom-0123456789abcdef", build.BUSYBOX_PACKAGE: "1:1.35.0-4+b3"}


def pykvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def fake_build(root: Path, packages: dict[str, str], key: str | None = None,
               kernel_key: str = "kernel-00000000000000aa") -> Path:
    """A cache entry as build.py leaves one; ``key`` other than the real one stands for a
    build of other pykvm sources."""
    key = key or build.cache_key(packages)
    result = root / f"linux-{key[:16]}"
    result.mkdir(parents=True)
    (result / "vmlinux").write_bytes(b"\x7fELF")
    (result / "initramfs.cpio").write_bytes(b"070701")
    (result / "manifest.json").write_text(json.dumps(
        {"key": key, "packages": packages, "kernel_key": kernel_key}))
    return result


def test_a_build_counts_only_for_this_pykvms_sources(tmp_path):
    ours = fake_build(tmp_path, CUSTOM)
    link = tmp_path / build.DEFAULT_LINK
    link.symlink_to(ours.name)
    assert cache.find_guest(tmp_path) == ours
    # the same link to a build whose key is not that of these sources (another version)
    link.unlink()
    other = fake_build(tmp_path, CUSTOM, key="f" * 64)
    link.symlink_to(other.name)
    assert cache.find_guest(tmp_path) is None


def test_the_default_link_cannot_lead_out_of_the_cache(tmp_path):
    outside = fake_build(tmp_path / "elsewhere", CUSTOM)
    root = tmp_path / "cache"
    root.mkdir()
    for target in (str(outside), f"../elsewhere/{outside.name}"):
        link = root / build.DEFAULT_LINK
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        assert cache.find_guest(root) is None, target


def test_path_without_a_guest_is_one_line_naming_the_build(tmp_path):
    done = pykvm("guest", "path", env={"PYKVM_CACHE": str(tmp_path), "PYKVM_GUEST_DIR": ""})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "not built: run `pykvm guest build`" in done.stderr


def test_path_prints_the_guest_run_boots(tmp_path):
    ours = fake_build(tmp_path, CUSTOM)
    (tmp_path / build.DEFAULT_LINK).symlink_to(ours.name)
    env = {"PYKVM_CACHE": str(tmp_path), "PYKVM_GUEST_DIR": ""}
    assert pykvm("guest", "path", env=env).stdout.split() == [
        str(ours / "vmlinux"), str(ours / "initramfs.cpio")]
    for flag, expected in (("--kernel", ours / "vmlinux"), ("--initrd", ours / "initramfs.cpio"),
                           ("--dir", ours)):
        done = pykvm("guest", "path", flag, env=env)
        assert (done.returncode, done.stdout) == (0, f"{expected}\n"), flag


def test_clean_keeps_the_guest_its_kernel_and_what_is_not_the_builders(tmp_path):
    root = tmp_path / "cache"
    current = fake_build(root, CUSTOM, kernel_key="kernel-00000000000000aa")
    (root / build.DEFAULT_LINK).symlink_to(current.name)
    old = fake_build(root, CUSTOM, key="e" * 64)
    for directory in ("src/linux-source-6.1_1", "build/linux-source-6.1_1",
                      "kernel-00000000000000aa", "kernel-00000000000000bb", ".linux-scratch",
                      "snapshots/0123", "distro/debian"):
        (root / directory).mkdir(parents=True)
        (root / directory / "file").write_bytes(b"x" * 1000)
    (root / "notes.txt").write_text("mine")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("not the cache's")
    (root / "linux-evil").symlink_to(victim)          # removed as a link, never followed
    (root / "src" / "into-victim").symlink_to(victim)

    done = cache.clean(root=root)
    assert sorted(done.removed) == sorted([".linux-scratch", "build", "kernel-00000000000000bb",
                                           old.name, "linux-evil", "src"])
    assert done.kept == current and done.freed >= 4000
    assert (victim / "precious").read_text() == "not the cache's"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [build.DEFAULT_LINK, "distro", "kernel-00000000000000aa", current.name, "linux.lock",
         "notes.txt", "snapshots"])
    assert cache.find_guest(root) == current

    everything = cache.clean(everything=True, root=root)
    assert sorted(everything.removed) == sorted(
        ["kernel-00000000000000aa", current.name, build.DEFAULT_LINK])
    assert sorted(p.name for p in root.iterdir()) == ["distro", "linux.lock", "notes.txt",
                                                       "snapshots"]


def test_clean_from_the_command_line(tmp_path):
    (tmp_path / "build").mkdir()
    done = pykvm("guest", "clean", env={"PYKVM_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed 1 entries") and not (tmp_path / "build").exists()


def test_missing_packages_for_a_user_are_one_line_naming_them(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(GuestBuildError) as raised:
        build.ensure_packages(("pykvm-no-such-package", "dpkg"))
    message = str(raised.value)
    assert "\n" not in message
    assert message.endswith("sudo apt-get install pykvm-no-such-package")


def test_a_long_step_says_what_it_last_did(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(host, "PROGRESS_EVERY", 0.2)      # build.run is host.run
    log = tmp_path / "build.log"
    build.run(["sh", "-c", "echo '  CC      kernel/fork.o'; sleep 1"], log=log)
    assert "... CC      kernel/fork.o" in capsys.readouterr().err
    with pytest.raises(build.BuildFailed, match=f"full log: {log}"):
        build.run(["sh", "-c", "echo broken; exit 2"], log=log)
    with pytest.raises(build.BuildFailed, match="pykvm-no-such-tool is not installed"):
        build.run(["pykvm-no-such-tool"], log=log)


def test_kernel_source_tree_or_tarball_becomes_the_tree_the_build_uses(tmp_path):
    root = tmp_path / "cache"
    tree = tmp_path / "linux-6.1.99"
    tree.mkdir()
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 99\n")
    version = build.custom_source(root, tree)
    assert version.startswith(build.CUSTOM_SOURCE_PREFIX)
    used = root / "src" / f"{build.SOURCE_PACKAGE}_{version}"
    assert used.is_symlink() and used.resolve() == tree    # only read, built out of tree
    assert build.source_tree(root, version) == used         # so nothing is extracted

    tarball = tmp_path / "linux-6.1.99.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tmp_path), tree.name], check=True)
    from_tarball = build.custom_source(root, tarball)
    assert from_tarball != version
    extracted = root / "src" / f"{build.SOURCE_PACKAGE}_{from_tarball}"
    assert (extracted / "Makefile").read_text().startswith("VERSION = 6")
    assert build.custom_source(root, tarball) == from_tarball    # once per tarball

    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "empty", "no Makefile"), (tmp_path / "none", "no such"),
                         (tree / "Makefile", "not a tar archive")):
        with pytest.raises(GuestBuildError, match=message):
            build.custom_source(root, bad)
