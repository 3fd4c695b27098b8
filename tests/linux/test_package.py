"""pykvm as a user gets it (issue #20): the wheel and sdist that `python -m build` makes,
the wheel installed into a fresh venv, used from a project that is not this repository.

- the wheel and the sdist carry the default guest's sources (kernel.fragment, init.c,
  agent.c, the builder) and declare the runtime dependencies;
- ``pykvm --version`` is pyproject's version, ``pykvm guest path`` finds the guest this
  checkout's ``make guest`` built (the cache key is over the sources, wherever they are
  installed), ``pykvm run -- sh -c 'exit 3'`` exits 3;
- pytest in the project, with nothing but the installed plugin: a ``linux_vm`` test and a
  ``vm`` test pass (none skipped); with ``--pykvm-require --pykvm-device /nonexistent``
  the run fails instead of skipping.

The venv gets pykvm's wheel alone (pip --no-deps --no-index) and borrows the
dependencies (pyroute2, zstandard, lz4, pytest) from the environment running this test
through a .pth file, which appends that site-packages *after* the venv's own, so
``import pykvm`` is the wheel's (checked). Why: this checks what the wheel carries and
how pykvm behaves installed; it runs offline and in seconds, while resolving the
dependencies from PyPI is pip's job (the wheel's Requires-Dist is checked instead).

Boots Linux once for ``pykvm run``; the ``linux_vm`` test restores the plugin's cached
snapshot when a session of the same pykvm sources made one, and boots once otherwise.
The ``pykvm run`` starts as soon as the package is installed and boots while the other
tests run (a boot is minutes on kvm_pvm hosts); its test waits for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm.machine import default_guest_dir

from ..conftest import _REASON

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
GUEST_SOURCES = ("kernel.fragment", "init.c", "agent.c", "build.py", "host.py", "kernel.py",
                 "initramfs.py", "cache.py", "cli.py")
BOOT_TIMEOUT = 1500          # seconds for a command that boots Linux (minutes on kvm_pvm)

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(_REASON is not None, reason=f"needs /dev/kvm: {_REASON}"),
    pytest.mark.skipif(default_guest_dir() is None,
                       reason="the default Linux guest is not built (pykvm guest build)"),
]

PROJECT_TESTS = textwrap.dedent('''
    import pykvm


    def test_linux(linux_vm):
        assert pykvm.__file__.startswith(VENV), pykvm.__file__    # the wheel's pykvm
        result = linux_vm.exec("uname -s; echo oops >&2; exit 4")
        assert (result.status, result.stdout, result.stderr) == (4, b"Linux\\n", b"oops\\n")


    def test_flat(vm):
        result = vm.run("mov $COM1, %dx\\nmov $'k', %al\\nout %al, %dx\\n"
                        "mov $5, %al\\nout %al, $EXIT_PORT")
        assert (result.output, result.status) == (b"k", 5)
''')


@dataclass
class Installed:
    dist: Path               # the wheel and the sdist
    venv: Path
    project: Path            # a user's project: a cwd outside this repository
    env: dict[str, str]
    command: subprocess.Popen | None = None     # `pykvm run -- ...`, started early

    def start(self, *args: str) -> subprocess.Popen:
        """``pykvm ARGS`` in the background, its output to files in the project."""
        with open(self.project / "run.out", "wb") as out, open(self.project / "run.err",
                                                               "wb") as err:
            return subprocess.Popen([str(self.venv / "bin" / "pykvm"), *args], cwd=self.project,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pykvm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "pykvm"), *args, timeout=timeout)

    def pytest(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "python"), "-m", "pytest", "-p",
                        "no:cacheprovider", "-rA", *args, timeout=BOOT_TIMEOUT)


def user_environment(venv: Path) -> dict[str, str]:
    """This process's environment as a user's shell would have it: the venv first on PATH,
    nothing pointing into the repository or at another guest; the cache (where the guest
    and the boot snapshots are) stays."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST", "PYTHON", "VIRTUAL_ENV", "PYKVM_"))
           or name in ("PYKVM_CACHE", "PYKVM_SNAPSHOTS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    dist, venv, project = root / "dist", root / "venv", root / "project"
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                           str(REPO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel, = dist.glob("*.whl")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                           "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "userproject"\nversion = "1"\n'
                                            '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (project / "tests").mkdir()
    (project / "tests" / "test_vms.py").write_text(f"VENV = {str(venv)!r}\n{PROJECT_TESTS}")
    installed = Installed(dist, venv, project, user_environment(venv))
    installed.command = installed.start("run", "--", "sh", "-c", "echo from the guest; exit 3")
    yield installed
    if installed.command.poll() is None:       # its test was not selected
        installed.command.kill()
        installed.command.wait()


def test_the_wheel_and_sdist_carry_the_guest_sources_and_dependencies(installed):
    wheel, = installed.dist.glob(f"pykvm-{VERSION}-*.whl")
    sdist, = installed.dist.glob(f"pykvm-{VERSION}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"pykvm-{VERSION}.dist-info/METADATA").decode()
        entry_points = archive.read(f"pykvm-{VERSION}.dist-info/entry_points.txt").decode()
    assert {f"pykvm/guestimage/{name}" for name in GUEST_SOURCES} <= names
    with tarfile.open(sdist) as archive:
        sdist_names = set(archive.getnames())
    assert {f"pykvm-{VERSION}/pykvm/guestimage/{name}" for name in GUEST_SOURCES} <= sdist_names
    for requirement in ("pyroute2", "zstandard", "lz4"):
        assert f"Requires-Dist: {requirement}" in metadata
    assert "pykvm = pykvm.pytest_plugin" in entry_points and "pykvm = pykvm.cli:main" in entry_points


def test_version_and_guest_path_from_the_installed_package(installed):
    done = installed.pykvm("--version")
    assert (done.returncode, done.stdout) == (0, f"pykvm {VERSION}\n"), done.stderr
    done = installed.run(str(installed.venv / "bin" / "python"), "-c",
                         "import pykvm; print(pykvm.__file__)")
    assert done.stdout.startswith(str(installed.venv)), done.stdout + done.stderr
    done = installed.pykvm("guest", "path")
    assert done.returncode == 0, done.stderr
    guest = default_guest_dir()              # what this checkout finds: the same build
    assert done.stdout.split() == [str(guest / "vmlinux"), str(guest / "initramfs.cpio")]


def test_run_a_command_and_get_its_status(installed):
    status = installed.command.wait(timeout=BOOT_TIMEOUT)
    stderr = (installed.project / "run.err").read_text(errors="replace")
    assert status == 3, stderr[-3000:]
    assert (installed.project / "run.out").read_text() == "from the guest\n"


def test_pytest_in_a_users_project(installed):
    done = installed.pytest()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]


def test_pytest_with_require_and_no_kvm_fails(installed):
    done = installed.pytest("--pykvm-require", "--pykvm-device", "/nonexistent")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout[-3000:]
    assert "2 errors" in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]
    assert "KVM is not usable: /nonexistent does not exist" in done.stdout
