"""``pykvm image debian`` and ``pykvm run --image`` (issue #15 items 3 and 4).

Unit tests: the request's validation, the cache key, the host's apt sources, the safe
writing of the output (no symlink followed, no overwrite without --force, sparse), the
cache's reuse, and what --image adds to a run. The ``linux`` tests build a real
bookworm minbase with mmdebstrap (cached under $PYKVM_CACHE/images: a few minutes once,
then a copy) and boot it: ``-- cat /etc/os-release`` through the initramfs path, and the
agent's exec and file copies in the Debian root.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pykvm import cli
from pykvm.distro import boot, debian
from pykvm.errors import ConfigError

BOOT_TIMEOUT = 900
TEST_SIZE = "1G"


@pytest.fixture
def fixed_tool(monkeypatch):
    """Keys without asking mmdebstrap (the unit tests run where it is not installed)."""
    monkeypatch.setattr(debian, "tool_version", lambda: "mmdebstrap 1.3.5")


@pytest.mark.parametrize("fields, message", [
    ({"suite": "Bookworm"}, "not a Debian suite name"),
    ({"suite": "bookworm; rm -rf /"}, "not a Debian suite name"),
    ({"size": 1 << 20}, "must be between"),
    ({"size": 1 << 50}, "must be between"),
    ({"packages": ("curl", "--allow-unauthenticated")}, "not a Debian package name"),
    ({"packages": ("Curl",)}, "not a Debian package name"),
    ({"packages": tuple(f"p{n}" for n in range(201))}, "at most 200"),
    ({"mirror": "deb.debian.org/debian"}, "not a URI"),
    ({"mirror": "http://x/ debian"}, "not a URI"),
])
def test_bad_requests_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        debian.DebianImage(**fields)


def test_the_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    output = tmp_path / "root.img"
    assert cli.main(["image", "debian", "-o", str(output), "--packages", "a b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Debian package name" in err
    assert cli.main(["image", "debian", "-o", str(output), "--size", "lots"]) == 2
    assert "cannot read the size" in capsys.readouterr().err
    assert not output.exists()


def test_the_key_follows_every_input_and_not_the_package_order(fixed_tool, monkeypatch):
    base = debian.DebianImage(packages=debian.parse_packages("curl,less"))
    assert debian.parse_packages("less, curl,,curl") == ("curl", "less")
    assert base.key() == debian.DebianImage(packages=("curl", "less")).key()
    variants = [debian.DebianImage(suite="trixie", packages=base.packages),
                debian.DebianImage(size=debian.GiB, packages=base.packages),
                debian.DebianImage(packages=("curl",)),
                debian.DebianImage(kernel=True, packages=base.packages),
                debian.DebianImage(mirror="http://mirror.example/debian",
                                   packages=base.packages)]
    keys = {base.key()} | {image.key() for image in variants}
    assert len(keys) == 1 + len(variants)
    monkeypatch.setattr(debian, "tool_version", lambda: "mmdebstrap 1.4.0")
    assert base.key() not in keys            # a new mmdebstrap builds anew
    assert base.name().startswith("debian-bookworm-")


def test_mmdebstrap_is_asked_for_minbase_the_packages_and_the_mirror():
    image = debian.DebianImage(packages=("less",), kernel=True, mirror="http://m.example/debian")
    command = image.mmdebstrap_command(Path("/x/tree"))
    assert command[:2] == ["mmdebstrap", "--variant=minbase"]
    assert f"--include=less,{debian.KERNEL_PACKAGE}" in command
    assert command[-3:] == ["bookworm", "/x/tree", "http://m.example/debian"]
    assert debian.DebianImage().mmdebstrap_command(Path("/t"))[-2:] == ["bookworm", "/t"]


def test_the_mirror_comes_from_the_hosts_apt_sources(tmp_path):
    listing = tmp_path / "sources.list"
    listing.write_text("# deb http://commented.example/debian bookworm main\n"
                       "deb [signed-by=/k.gpg] http://security.example/debian-security "
                       "bookworm-security main\n"
                       "deb http://one.example/debian bookworm main\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: x\n\n"
        "Types: deb\n# comment\nURIs: http://deb822.example/debian\nSuites: bookworm\n"
        "Components: main\n")
    assert debian.host_mirror((listing, parts)) == "http://one.example/debian"
    assert debian.host_mirror((tmp_path / "none", parts)) == "http://deb822.example/debian"
    assert debian.host_mirror((tmp_path / "none",)) == ""


def _fake_built(directory: Path, with_kernel: bool) -> debian.BuiltImage:
    directory.mkdir()
    with open(directory / debian.ROOT_IMAGE, "wb") as image:
        image.seek(64 << 20)
        image.write(b"end")
        image.seek(4096)
        image.write(b"superblock")
    if with_kernel:
        (directory / debian.KERNEL).write_bytes(b"kernel")
        (directory / debian.INITRD).write_bytes(b"initrd")
    return debian.BuiltImage(directory)


def test_export_is_sparse_and_puts_the_kernel_beside_the_image(tmp_path):
    built = _fake_built(tmp_path / "cache", with_kernel=True)
    output = tmp_path / "out" / "root.img"
    output.parent.mkdir()
    written = debian.export(built, output)
    assert written == [output, tmp_path / "out" / "root.vmlinuz",
                       tmp_path / "out" / "root.initrd.img"]
    assert output.read_bytes() == built.root.read_bytes()
    assert os.stat(output).st_blocks * 512 < 1 << 20          # holes stayed holes
    assert (tmp_path / "out" / "root.vmlinuz").read_bytes() == b"kernel"
    assert sorted(p.name for p in output.parent.iterdir()) == \
        ["root.img", "root.initrd.img", "root.vmlinuz"]        # no temporary left behind


def test_export_refuses_symlinks_and_overwrites_only_with_force(tmp_path):
    built = _fake_built(tmp_path / "cache", with_kernel=False)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "root.img"
    link.symlink_to(victim)
    for force in (False, True):
        with pytest.raises(ConfigError, match="symbolic link"):
            debian.export(built, link, force=force)
    assert victim.read_bytes() == b"precious" and link.is_symlink()

    existing = tmp_path / "existing.img"
    existing.write_bytes(b"old")
    with pytest.raises(ConfigError, match="--force"):
        debian.export(built, existing)
    assert existing.read_bytes() == b"old"
    debian.export(built, existing, force=True)
    assert existing.read_bytes() == built.root.read_bytes()


def test_a_symlink_beside_the_image_is_refused_before_anything_is_written(tmp_path):
    built = _fake_built(tmp_path / "cache", with_kernel=True)
    (tmp_path / "root.vmlinuz").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symbolic link"):
        debian.export(built, tmp_path / "root.img")
    assert not (tmp_path / "root.img").exists() and not (tmp_path / "elsewhere").exists()


def test_the_cli_refuses_an_existing_output_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(debian, "build", lambda *a, **k: pytest.fail("built anyway"))
    output = tmp_path / "root.img"
    output.write_bytes(b"mine")
    assert cli.main(["image", "debian", "-o", str(output)]) == 2
    assert "--force" in capsys.readouterr().err and output.read_bytes() == b"mine"


def test_a_second_request_is_served_from_the_cache(tmp_path, fixed_tool, monkeypatch):
    builds = []

    def fake_build(image, scratch, say):
        builds.append(image)
        (scratch / debian.ROOT_IMAGE).write_bytes(b"image")
        (scratch / debian.MANIFEST).write_text("{}")

    monkeypatch.setattr(debian, "_build_into", fake_build)
    image = debian.DebianImage()
    first = debian.build(image, root=tmp_path)
    again = debian.build(debian.DebianImage(), root=tmp_path)
    assert first == again and len(builds) == 1 and again.root.read_bytes() == b"image"
    debian.build(debian.DebianImage(packages=("less",)), root=tmp_path)
    debian.build(image, root=tmp_path, rebuild=True)
    assert len(builds) == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")]
    assert leftovers == []


def test_building_needs_root_but_a_cached_image_does_not(tmp_path, fixed_tool, monkeypatch):
    monkeypatch.setattr(debian, "_build_into", lambda *a: pytest.fail("built without root"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(debian.GuestBuildError, match="needs root"):
        debian.build(debian.DebianImage(), root=tmp_path)
    cached = tmp_path / debian.DebianImage().name()
    cached.mkdir()
    (cached / debian.MANIFEST).write_text("{}")
    assert debian.build(debian.DebianImage(), root=tmp_path).directory == cached


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path, fixed_tool, monkeypatch):
    def failing(image, scratch, say):
        (scratch / "half").write_bytes(b"x")
        raise debian.GuestBuildError("mmdebstrap failed with status 1")

    monkeypatch.setattr(debian, "_build_into", failing)
    with pytest.raises(debian.GuestBuildError):
        debian.build(debian.DebianImage(), root=tmp_path)
    assert debian.find(debian.DebianImage(), tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def _run_args(*words: str) -> argparse.Namespace:
    argv = list(words)
    command = None
    if "--" in argv:
        command = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = cli.build_parser().parse_args(["run", *argv])
    args.command_args = command
    return args


def test_image_becomes_the_first_disk_and_the_root(tmp_path):
    args = _run_args("--disk", "data.img", "--image", "root.img,ro", "-p", "quiet")
    boot.apply_image(args)
    assert args.disk == ["root.img,ro", "data.img"]
    assert args.append == "root=/dev/vda ro quiet"
    assert args.kernel is None             # pykvm's own guest kernel and /init
    args = _run_args("--image", "root.img")
    boot.apply_image(args)
    assert args.append == "root=/dev/vda rw"


def test_image_kernel_is_taken_from_beside_the_image_and_refuses_commands(tmp_path):
    image = tmp_path / "root.img"
    image.write_bytes(b"")
    with pytest.raises(ConfigError, match="pykvm image debian --kernel"):
        boot.apply_image(_run_args("--image", str(image), "--image-kernel"))
    (tmp_path / "root.vmlinuz").write_bytes(b"k")
    (tmp_path / "root.initrd.img").write_bytes(b"i")
    args = _run_args("--image", str(image), "--image-kernel")
    boot.apply_image(args)
    assert (args.kernel, args.initrd) == (tmp_path / "root.vmlinuz",
                                          tmp_path / "root.initrd.img")
    with pytest.raises(ConfigError, match="pykvm's /init"):
        boot.apply_image(_run_args("--image", str(image), "--image-kernel", "--", "true"))
    with pytest.raises(ConfigError, match="one root"):
        boot.apply_image(_run_args("--image", str(image), "--rootfs", "/"))
    with pytest.raises(ConfigError, match="goes with --image"):
        boot.apply_image(_run_args("--image-kernel"))


# --- real builds and boots -----------------------------------------------------------------

def _debian_root(tmp_path: Path) -> Path:
    """The bookworm minbase test image, built once per $PYKVM_CACHE, copied to tmp_path."""
    from pykvm.machine import default_guest_dir

    from ..conftest import _REASON

    if _REASON is not None:
        pytest.skip(f"needs /dev/kvm: {_REASON}")
    if default_guest_dir() is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap missing (apt-get install mmdebstrap)")
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap --mode=root needs root")
    image = debian.DebianImage(size=debian.GiB, mirror=debian.host_mirror())
    built = debian.build(image, say=lambda line: print(line, file=sys.stderr))
    output = tmp_path / "root.img"
    debian.export(built, output)
    return output


@pytest.mark.linux
def test_a_command_runs_in_a_built_debian_image(tmp_path):
    root = _debian_root(tmp_path)
    probe = subprocess.run(["debugfs", "-R", "cat /usr/lib/os-release", str(root)],
                           capture_output=True, timeout=60)
    assert b"bookworm" in probe.stdout          # mke2fs -d made an ext4 with Debian in it
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--image", f"{root},ro",
                           "--", "cat /etc/os-release; exit 3"],
                          capture_output=True, timeout=BOOT_TIMEOUT)
    assert done.returncode == 3, done.stderr.decode(errors="replace")[-2000:]
    text = done.stdout.decode()
    assert 'ID=debian' in text and 'VERSION_CODENAME=bookworm' in text, text


@pytest.mark.linux
def test_the_agent_runs_in_a_built_debian_image(tmp_path):
    from pykvm.devices.virtio import DiskSpec
    from pykvm.machine import MachineConfig, build_for_boot, default_linux_guest

    root = _debian_root(tmp_path)
    kernel, initrd = default_linux_guest()
    config = MachineConfig(kernel=kernel, initrd=initrd, mem_size=256 << 20, agent=True,
                           disks=[DiskSpec(str(root))], append="root=/dev/vda rw")
    console = io.BytesIO()
    machine = build_for_boot(config, stdout=console, stderr=console)
    stops = []
    runner = threading.Thread(target=lambda: stops.append(machine.run()), daemon=True)
    runner.start()
    try:
        machine.wait_for_agent(BOOT_TIMEOUT)
        seen = machine.exec("dpkg-query -W -f '${Package}' dpkg; cat /etc/debian_version",
                            timeout=300, check=True)
        assert seen.stdout.startswith(b"dpkg12.")            # Debian's dpkg, Debian 12
        machine.put_file("/root/from-host", b"copied in\n")
        assert machine.get_file("/root/from-host") == b"copied in\n"
        # SIGUSR2 to PID 1 is busybox poweroff's way: init ends the guest with 0, after
        # remounting the image read-only so its journal is left empty
        machine.exec("(sleep 1; kill -USR2 1) >/dev/null 2>&1 &", timeout=300, check=True)
        runner.join(300)
        assert not runner.is_alive() and (stops[0].kind, stops[0].status) == ("exit", 0), stops
    finally:
        machine.request_stop("user", 0, "test done")
        runner.join(60)
        machine.close()
    # the copy landed in the image itself (rw), read back on the host without a mount
    probe = subprocess.run(["debugfs", "-R", "cat /root/from-host", str(root)],
                           capture_output=True, timeout=60)
    assert probe.stdout == b"copied in\n", console.getvalue()[-2000:]
    header = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True, text=True,
                            timeout=60).stdout
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features"))
    assert "needs_recovery" not in features and "clean" in header, header
