"""Putting a guest into an assembled machine's RAM and its first vCPU: a flat binary
at FLAT_LOAD_ADDR in the CPU mode it asks for, or a Linux kernel through the 64-bit
boot protocol (pykvm/boot/linux.py) with its command line and firmware tables.
Only :func:`pykvm.machine.builder.build_for_boot` calls :func:`load_guest`; a machine
built from a snapshot gets its RAM and registers from the snapshot instead."""

from __future__ import annotations

import os
from pathlib import Path

from .. import layout
from ..errors import ConfigError, ImageError
from ..images import read_image_file
from .config import format_size

LINUX_CONSOLE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


def load_guest(machine):
    """Load ``machine.config``'s guest; the Linux boot record, or None for a flat binary."""
    from ..boot.modes import set_mode

    config, memory = machine.config, machine.memory
    vcpu = machine.vm.vcpus[0]
    if config.flat is not None:
        image = read_image_file(config.flat, "flat binary")
        load = layout.FLAT_LOAD_ADDR
        room = memory.size - load if memory.size <= layout.PCI_HOLE_START \
            else layout.PCI_HOLE_START - load
        if len(image) > room:
            raise ImageError(f"{config.flat}: flat binary of {len(image)} bytes does not fit "
                             f"in guest RAM above {load:#x} ({format_size(config.mem_size)})")
        memory.write(load, image)
        set_mode(vcpu, memory, config.entry, load)
        return None
    from ..boot.linux import load_linux

    initrd = read_image_file(config.initrd, "initrd") if config.initrd else b""
    if config.command is not None:
        from ..boot.cpio import command_archive
        initrd = pad4(initrd) + command_archive(config.command)
    boot = load_linux(memory, str(config.kernel), initrd or None, linux_cmdline(machine),
                      extract=config.extract_kernel)
    del initrd
    release_freed_heap()
    write_firmware_tables(machine, boot)
    set_mode(vcpu, memory, "long", boot.entry, rsi=boot.boot_params_addr)
    return boot


def write_firmware_tables(machine, boot) -> None:
    """How Linux finds its CPUs, IOAPIC and power-off: the ACPI tables (RSDP in the
    zero page and at 0xE0000), and the MP table for a kernel booted with acpi=off."""
    from ..boot.acpi import write_acpi_tables
    from ..boot.mptable import write_mptable
    from ..boot.zeropage import set_acpi_rsdp

    write_mptable(machine.memory, machine.config.cpus)
    machine.acpi_tables = write_acpi_tables(machine.memory, machine.config.cpus,
                                            keyboard=machine.config.keyboard)
    set_acpi_rsdp(machine.memory, boot.boot_params_addr, machine.acpi_tables.rsdp)


def linux_cmdline(machine) -> str:
    """The kernel command line for ``machine``: its consoles, devices and options."""
    config, virtio = machine.config, machine.virtio
    parts = [LINUX_CONSOLE_CMDLINE]
    if config.console == "virtio":
        parts = [LINUX_CONSOLE_CMDLINE.replace("console=ttyS0", "console=hvc0")]
    # A PCI guest needs no pci= word: the DSDT declares bus 0 as an ACPI root bridge
    # (boot/acpi.py), and with ACPI Linux scans the roots ACPI declares and routes
    # INTx through their _PRT. Never `pci=noacpi`: that also turns off ACPI's interrupt
    # routing, and a kernel without an MP-table parser (Debian's cloud flavour) then
    # disables its local APIC: one CPU, no IOAPIC (arch/x86/kernel/acpi/boot.c,
    # acpi_mps_check).
    if virtio is None or virtio.pci is None:
        parts.append("pci=off")   # no PCI devices: spare the guest the bus scan
        if virtio is not None:
            parts.append(virtio.cmdline())   # virtio-mmio: announced, not discovered
    if config.command is not None and not config.verbose:
        parts.append("quiet")
    if config.agent or config.shares:
        from ..agent import CMDLINE_FLAG
        parts.append(CMDLINE_FLAG)      # the default guest's /init starts pykvm-agent
    if config.live_shares:
        from ..share import virtiofs_cmdline
        parts.append(virtiofs_cmdline(config))   # the default guest's /init mounts them
    dhcp = [nic.mac.hex(":") for nic in (virtio.nets if virtio else []) if nic.dhcp]
    if dhcp:
        parts.append("pykvm.dhcp=" + ",".join(dhcp))  # /init runs udhcpc on these NICs
    if config.rootfs:
        from ..share import rootfs_cmdline
        parts.append(rootfs_cmdline(config))     # /init switches to that root
    from ..boot.bzimage import version_of_file
    version = version_of_file(config.kernel)
    # Tell the kernel its TSC frequency instead of letting it calibrate against the
    # PIT: calibration is slow everywhere and fails outright when guest ring 0 is
    # emulated (kvm_pvm), leaving a guest clock that runs at a third of real time.
    # Times the clock slowdown: a guest told its TSC is N times faster keeps time, and
    # sets its timer deadlines, N times slower (quirks/cmdline.py says when and why).
    slowdown = config.clock_slowdown or machine.vm.quirks.clock_slowdown(version)
    parts.append(f"tsc_early_khz={machine.vm.vcpus[0].tsc_khz() * slowdown}")
    parts.append(config.append)
    return machine.vm.quirks.adjust_cmdline(" ".join(p for p in parts if p), version)


def pad4(data: bytes) -> bytes:
    """Concatenated initramfs archives must start 4-byte aligned."""
    return data + b"\0" * (-len(data) % 4)


def release_freed_heap() -> None:
    """Give the host back what loading the kernel freed. The kernel image, its extracted
    vmlinux and the initrd pass through Python bytes (tens of MiB at the peak); glibc keeps
    freed memory in its heap, which left ~8 MiB resident for the VM's whole life
    (bench/memory.py). malloc_trim(0) is glibc's; elsewhere there is nothing to call."""
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


# The default guest's files (pykvm/guestimage/build.py writes them): its kernels, in the
# order a run prefers them (the vmlinux skips the decompressor), and its initramfs.
GUEST_KERNELS = ("vmlinux", "bzImage")
GUEST_INITRAMFS = "initramfs.cpio"


def guest_files(directory: Path) -> tuple[Path, Path | None]:
    """The default guest's kernel in ``directory`` and its initramfs (None if absent)."""
    kernel = next((directory / name for name in GUEST_KERNELS if (directory / name).exists()),
                  directory / GUEST_KERNELS[-1])
    initrd = directory / GUEST_INITRAMFS
    return kernel, initrd if initrd.exists() else None


def default_guest_dir() -> Path | None:
    """Where the default Linux guest is: $PYKVM_GUEST_DIR, else the cache's build of this
    pykvm's guest sources (`pykvm guest build`; pykvm/guestimage/cache.py); None if neither."""
    from ..guestimage.cache import find_guest

    if os.environ.get("PYKVM_GUEST_DIR"):
        directory = Path(os.environ["PYKVM_GUEST_DIR"])
        if any((directory / name).exists() for name in GUEST_KERNELS):
            return directory
    return find_guest()


def default_initramfs() -> Path:
    """The default guest's initramfs, for `pykvm run --kernel K -- CMD` without --initrd:
    its /init is what runs the command and reports its status (guests/init), and it
    needs nothing of the kernel's but a console (busybox and pykvm-agent are static; no
    module is loaded), so it serves a distribution's kernel as well as pykvm's own."""
    directory = default_guest_dir()
    initrd = guest_files(directory)[1] if directory is not None else None
    if initrd is None:
        raise ConfigError("-- CMD with --kernel runs the command through pykvm's initramfs, "
                          "which is not built: run `pykvm guest build` (or give --initrd)")
    return initrd


def default_linux_guest() -> tuple[Path, Path | None]:
    directory = default_guest_dir()
    if directory is None:
        raise ConfigError("no --kernel given and the default guest is not built: run `pykvm guest build` "
                          "(or pass --kernel PATH)")
    return guest_files(directory)
