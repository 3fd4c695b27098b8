"""SMP Linux boots of the default guest: four vCPUs found through the ACPI MADT
(the default) and, with ``acpi=off``, two through the MP table; power-off through
ACPI S5, and without ACPI through the halt pykvm notices. Each boot costs
minutes on kvm_pvm hosts, so there is one boot per firmware path and each
serves several assertions."""

import re
import subprocess
import sys
import time

import pytest

from pykvm.machine import default_guest_dir

from ..conftest import needs_kvm

GUEST = default_guest_dir()
BOOT_TIMEOUT = 1800   # seconds: two emulated vCPUs on a busy 2-core kvm_pvm host are slow

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]

# What each boot prints, then it powers off with `poweroff -f` (reboot(RB_POWER_OFF)
# straight from the command: the default /init would otherwise take the exit port).
SCRIPT = (
    "echo nproc=$(nproc); "
    "echo cpuinfo=$(grep -c ^processor /proc/cpuinfo); "
    "grep -E '^(apicid|cpu cores|siblings)' /proc/cpuinfo | tr -d '\\t' | sed 's/^/info:/'; "
    "echo interrupts=$(head -1 /proc/interrupts); "
    "dmesg | grep -E '{pattern}' | sed 's/^/log:/'; "
    "poweroff -f"
)


def boot(*args: str, pattern: str):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "--mem", "256M", "--stats", *args, "--",
         SCRIPT.format(pattern=pattern)],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    result.elapsed = time.monotonic() - started
    return result


def values(result, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in result.stdout.splitlines()
            if line.startswith(key + "=")]


def cpuinfo(result, field: str) -> list[str]:
    return [line.split(":", 2)[2].strip() for line in result.stdout.splitlines()
            if line.startswith(f"info:{field}")]


def log(result) -> str:
    return "\n".join(line[4:] for line in result.stdout.splitlines() if line.startswith("log:"))


ACPI_CPUS = 4   # more vCPUs than the host's 2 CPUs: a guest need not fit the host


@pytest.fixture(scope="module")
def acpi_boot():
    return boot("--cpus", str(ACPI_CPUS),
                pattern="Using ACPI|ACPI: PM:|smpboot: Total|MPTABLE|MultiProcessor")


@pytest.fixture(scope="module")
def mptable_boot():
    return boot("--cpus", "2", "--append", "acpi=off",
                pattern="Using ACPI|ACPI|smpboot: Total|MPTABLE|MultiProcessor")


def test_acpi_cpus_found_through_the_madt(acpi_boot):
    assert values(acpi_boot, "nproc") == [str(ACPI_CPUS)], acpi_boot.stderr[-3000:]
    assert values(acpi_boot, "cpuinfo") == [str(ACPI_CPUS)]
    assert "Using ACPI (MADT) for SMP configuration information" in log(acpi_boot)
    assert f"Total of {ACPI_CPUS} processors activated" in log(acpi_boot)


def test_acpi_topology_is_one_package_of_n_cores(acpi_boot):
    n = str(ACPI_CPUS)
    assert cpuinfo(acpi_boot, "apicid") == [str(i) for i in range(ACPI_CPUS)]
    assert cpuinfo(acpi_boot, "cpu cores") == [n] * ACPI_CPUS
    assert cpuinfo(acpi_boot, "siblings") == [n] * ACPI_CPUS
    header = r"\s*" + r"\s+".join(f"CPU{i}" for i in range(ACPI_CPUS)) + r"\s*"
    assert re.fullmatch(header, values(acpi_boot, "interrupts")[0])


def test_poweroff_goes_through_acpi_s5_and_exits_0(acpi_boot):
    assert "ACPI: PM: (supports S0 S5)" in log(acpi_boot)
    assert acpi_boot.returncode == 0, acpi_boot.stderr[-3000:]
    assert "pykvm: guest powered off (ACPI S5)" in acpi_boot.stderr
    assert "device acpi-pm" in acpi_boot.stderr      # --stats: the PM1a port writes


def test_acpi_off_two_cpus_found_through_the_mp_table(mptable_boot):
    assert values(mptable_boot, "nproc") == ["2"], mptable_boot.stderr[-3000:]
    assert values(mptable_boot, "cpuinfo") == ["2"]
    text = log(mptable_boot)
    assert "Intel MultiProcessor Specification v1.4" in text
    assert "MPTABLE: OEM ID: PYKVM" in text
    assert "Total of 2 processors activated" in text
    assert "Using ACPI (MADT)" not in text


def test_acpi_off_poweroff_is_a_halt_pykvm_notices(mptable_boot):
    """Without ACPI, Linux's power-off halts every CPU with interrupts off; the idle
    monitor sees the BSP (and the AP) dead-halted and ends the VM with status 0."""
    assert mptable_boot.returncode == 0, mptable_boot.stderr[-3000:]
    assert "halted with interrupts disabled" in mptable_boot.stderr
    assert "ACPI S5" not in mptable_boot.stderr
