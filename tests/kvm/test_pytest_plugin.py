"""pykvm's pytest plugin (pykvm/pytest_plugin/), used the way a project would use it:
sample test files run by pytester in a session of their own.

- flat ``vm`` guests: one passes; one fails, and its report carries the guest's
  console output; ``kvm`` gives an open device;
- ``--pykvm-device /nonexistent``: every KVM test is skipped with the reason, none
  errors (no guest needed); with ``--pykvm-require`` or ``PYKVM_REQUIRE=1`` each of
  those skips is a failure instead;
- KVM usable but no Linux guest: a ``linux_vm`` test fails, naming ``pykvm guest build``;
- one ``linux_vm`` test (marked linux): with the same share as tests/kvm/test_agent.py's
  Linux test, so the snapshot that test's session made (kept in
  ~/.cache/pykvm/snapshots) is restored here instead of booting again.
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

# Read before pytester gives each test another HOME: the snapshots of this user's sessions.
from pykvm.machine import default_guest_dir  # noqa: E402
from pykvm.pytest_plugin import default_snapshot_root  # noqa: E402

SNAPSHOTS = default_snapshot_root()
# Looked up now, with this session's HOME: the pytester fixture gives each test another
# HOME, where ~/.cache/pykvm holds no guest (the test below then skipped every time).
GUEST_DIR = default_guest_dir()

FLAT_TESTS = textwrap.dedent('''
    def say(text):
        """Assembly that writes ``text`` to the serial port."""
        return "mov $COM1, %dx\\n" + "".join(
            f"mov ${ord(c)}, %al\\nout %al, %dx\\n" for c in text)


    def test_guest_passes(vm):
        result = vm.run(say("ok") + "mov $3, %al\\nout %al, $EXIT_PORT")
        assert result.output == b"ok" and result.status == 3


    def test_guest_fails(vm):
        result = vm.run(say("guest says boom\\n") + "mov $1, %al\\nout %al, $EXIT_PORT")
        assert result.status == 0, "the guest reported a failure"


    def test_long_mode_guest(vm):
        result = vm.run(say("64") + "mov $0, %al\\nout %al, $EXIT_PORT", mode="long")
        assert (result.output, result.status) == (b"64", 0)


    def test_device(kvm):
        assert kvm.api_version == 12
''')


def test_flat_guests_pass_fail_and_attach_the_console(pytester):
    from pykvm.pytest_plugin import kvm_unavailable_reason

    reason = kvm_unavailable_reason("/dev/kvm")
    if reason is not None:
        pytest.skip(f"needs /dev/kvm: {reason}")
    pytester.makepyfile(test_sample=FLAT_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*- pykvm console: vm -*", "*guest says boom*",
                                 "FAILED test_sample.py::test_guest_fails*"])
    # only the failing test carries the console section
    assert result.stdout.str().count("pykvm console: vm") == 1


def test_kvm_tests_skip_with_the_reason_when_the_device_is_missing(pytester):
    pytester.makepyfile(test_sample=FLAT_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "--pykvm-device", "/nonexistent")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["SKIPPED*KVM is not usable: /nonexistent does not exist*"])
    assert "error" not in result.stdout.str().lower().split("short test summary")[0]


def test_device_from_the_environment(pytester, monkeypatch):
    monkeypatch.setenv("PYKVM_DEVICE", "/nonexistent-too")
    pytester.makepyfile(test_sample="def test_device(kvm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*/nonexistent-too does not exist*"])


@pytest.mark.parametrize("how", ["option", "environment"])
def test_require_fails_instead_of_skipping(pytester, monkeypatch, how):
    pytester.makepyfile(test_sample=FLAT_TESTS)
    args = ["-p", "no:cacheprovider", "-rf", "--pykvm-device", "/nonexistent"]
    if how == "option":
        args.append("--pykvm-require")
    else:
        monkeypatch.setenv("PYKVM_REQUIRE", "1")
    result = pytester.runpytest(*args)
    result.assert_outcomes(errors=4)          # the fixture fails: an error at set-up
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*KVM is not usable: /nonexistent does not exist*"
                                 "--pykvm-require*"])


def test_require_off_in_the_environment_still_skips(pytester, monkeypatch):
    monkeypatch.setenv("PYKVM_REQUIRE", "0")
    pytester.makepyfile(test_sample="def test_device(kvm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--pykvm-device", "/nonexistent")
    result.assert_outcomes(skipped=1)


def test_linux_vm_fails_naming_the_build_command_when_no_guest_is_built(pytester, monkeypatch,
                                                                         tmp_path):
    from pykvm.pytest_plugin import kvm_unavailable_reason

    reason = kvm_unavailable_reason("/dev/kvm")
    if reason is not None:
        pytest.skip(f"needs /dev/kvm: {reason}")
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "empty-cache"))  # no guest built there
    for name in ("PYKVM_GUEST_DIR", "PYKVM_KERNEL", "PYKVM_REQUIRE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(test_sample="def test_guest(linux_vm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the default guest is not built; run `pykvm guest build`*"])
    assert "Traceback" not in result.stdout.str()


def test_vm_without_an_assembler_fails_naming_the_package(pytester, monkeypatch, tmp_path):
    from pykvm.pytest_plugin import kvm_unavailable_reason

    reason = kvm_unavailable_reason("/dev/kvm")
    if reason is not None:
        pytest.skip(f"needs /dev/kvm: {reason}")
    monkeypatch.setenv("PATH", str(tmp_path))           # no `as`, no `ld`
    pytester.makepyfile(test_sample='def test_asm(vm):\n    vm.run("hlt")\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*needs GNU binutils (as, ld missing): apt-get install binutils*"])


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*pykvm_cpus(n)*", "*pykvm_mem(size)*", "*pykvm_disk(*",
                                 "*pykvm_net(spec)*", "*pykvm_share(directory)*"])


def test_a_disk_is_keyed_by_its_bytes_and_options_not_its_path(tmp_path):
    """linux_vm's snapshots with pykvm_disk: one per disk content (each test's own image
    restores from it); a NIC or a disk served by another process boots every time."""
    from pykvm.machine import DiskSpec, NetSpec
    from pykvm.warm.guest import GuestSpec

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k" * 4096)
    images = []
    for name, data in (("a.img", b"\0" * 8192), ("b.img", b"\0" * 8192), ("c.img", b"x" * 8192)):
        images.append(tmp_path / name)
        images[-1].write_bytes(data)
    base = GuestSpec(kernel=str(kernel), initrd=None, append="", mem=1 << 27, cpus=1)

    def key(*disks):
        spec = GuestSpec(**{**base.__dict__, "disks": disks})
        assert spec.restorable
        return spec.key("/dev/kvm")

    same = key(DiskSpec(str(images[0]), serial="s"))
    assert key(DiskSpec(str(images[1]), serial="s")) == same         # another path, same bytes
    assert key(DiskSpec(str(images[2]), serial="s")) != same         # other bytes
    assert key(DiskSpec(str(images[0]), serial="t")) != same         # other options
    assert key(DiskSpec(str(images[0]), read_only=True, serial="s")) != same
    assert key() != same
    for spec in (GuestSpec(**{**base.__dict__, "nets": (NetSpec.parse("user"),)}),
                 GuestSpec(**{**base.__dict__, "disks": (DiskSpec("", socket="/x.sock"),)}),
                 GuestSpec(**{**base.__dict__, "disks": (DiskSpec(str(images[0]),
                                                                  format="qcow2"),)})):
        assert not spec.restorable


@pytest.mark.linux
def test_linux_vm_runs_commands(pytester, monkeypatch):
    from pykvm.pytest_plugin import kvm_unavailable_reason

    from .test_agent import make_share

    reason = kvm_unavailable_reason("/dev/kvm")
    if reason is not None:
        pytest.skip(f"needs /dev/kvm: {reason}")
    if GUEST_DIR is None:
        pytest.fail("KVM works but the default guest is not built: run pykvm guest build")
    share = make_share()
    # pytester gives the inner session another HOME: point it at this one's guest and snapshots
    monkeypatch.setenv("PYKVM_GUEST_DIR", str(GUEST_DIR))
    monkeypatch.setenv("PYKVM_SNAPSHOTS", str(SNAPSHOTS))
    pytester.makepyfile(test_linux=textwrap.dedent(f'''
        import pytest

        @pytest.mark.pykvm_share({str(share)!r})
        def test_guest(linux_vm):
            result = linux_vm.exec("cat /mnt/share/hello.txt; uname -s; echo oops >&2")
            assert (result.status, result.stdout, result.stderr) == (
                0, b"hello from the host\\nLinux\\n", b"oops\\n")
    '''))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
