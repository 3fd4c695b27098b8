"""The guest-physical memory map: the one place that says where things live.

Everything that places something in guest memory imports its address from here
(Firecracker's arch/x86_64/layout.rs plays the same role). Addresses below 1 MiB
follow the PC conventions a Linux guest expects.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# --- low memory (below 1 MiB) -------------------------------------------------
GDT_ADDR = 0x500            # boot GDT (Linux boot protocol: any safe low address)
IDT_ADDR = 0x520            # empty boot IDT
BOOT_STACK_TOP = 0x8000     # initial RSP for a flat long-mode guest / Linux entry
ZERO_PAGE_ADDR = 0x7000     # Linux struct boot_params ("zero page")
CMDLINE_ADDR = 0x20000      # kernel command line
CMDLINE_MAX = 0x10000
PML4_ADDR = 0x9000          # identity page tables: PML4, PDPT, then PDs
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # 4 page directories (0xB000..0xEFFF) map 4 GiB with 2 MiB pages
PD_COUNT = 4
MPTABLE_ADDR = 0x9FC00      # MP floating pointer + table, in the last KiB of base memory
EBDA_START = 0x9FC00
LOW_RAM_END = 0xA0000       # 640 KiB: VGA hole and BIOS ROMs follow
ACPI_ADDR = 0xE0000         # RSDP must sit in 0xE0000..0xFFFFF
ACPI_END = 0xF0000          # the ACPI tables (RSDP first) live in [ACPI_ADDR, ACPI_END)
MP_CONFIG_HIGH_ADDR = 0xF0000  # MP configuration table when it outgrows the EBDA (> ~40 vCPUs)
BDA_EBDA_SEGMENT = 0x40E    # BIOS data area: EBDA segment (word), where the MP spec looks first
BDA_BASE_MEM_KB = 0x413     # BIOS data area: KiB of base memory below the EBDA (word)
HIGH_RAM_START = 0x100000   # 1 MiB: where the kernel image conventionally starts

# --- flat (tutorial) guests ---------------------------------------------------
FLAT_LOAD_ADDR = 0x10000    # flat binaries are loaded here (real mode: CS=0x1000, IP=0)

# --- Linux --------------------------------------------------------------------
KERNEL_LOAD_ADDR = 0x1000000  # 16 MiB: a vmlinux's physical load address (CONFIG_PHYSICAL_START)

# --- the 32-bit hole below 4 GiB ------------------------------------------------
PCI_HOLE_START = 0xC0000000   # 3 GiB: RAM above this moves above 4 GiB
PCI_MMIO_START = 0xC0000000   # 32-bit PCI BAR window
PCI_MMIO_SIZE = 0x10000000    # 256 MiB
PCIE_ECAM_START = 0xE0000000  # reserved for an ECAM window
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
KVM_TSS_ADDR = 0xFFFBD000     # KVM_SET_TSS_ADDR needs 3 pages KVM owns
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
FOUR_GiB = 4 * GiB
PCI_MMIO64_START = 1 << 40    # 64-bit BAR window, far above any RAM

# --- PCI and interrupts -----------------------------------------------------------
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # configuration mechanism #1: address (4 bytes) ...
PCI_CONFIG_DATA_PORT = 0xCFC     # ... and data (0xCFC-0xCFF, any width)
PCI_INTX_GSIS = (5, 10, 11)      # ISA-free IRQs for PCI INTx, by slot (9 is the ACPI SCI)
PCI_SLOTS = 32                   # devices on bus 0 (one function each; slot 0: the host bridge)
# INTx routing, the one table both sides read: pin A of the device in slot S raises
# PCI_INTX_GSI_BY_SLOT[S] (pykvm/devices/pci/bus.py wires it, and sets Interrupt Line to
# it), and the DSDT's _PRT tells the guest so (pykvm/boot/acpi.py). pykvm's functions use
# pin A only (virtio-pci), so pins B-D have no route.
PCI_INTX_GSI_BY_SLOT = tuple(PCI_INTX_GSIS[slot % len(PCI_INTX_GSIS)] for slot in range(PCI_SLOTS))
MSI_GSI_BASE = 24                # GSIs from here on carry MSI routes (0-23 are the IOAPIC's)

# --- virtio-mmio (pykvm/devices/virtio/mmio.py; Firecracker's MMIO_MEM_START too) --------
VIRTIO_MMIO_START = 0xD0000000   # in the 32-bit hole, above the PCI BAR window
VIRTIO_MMIO_SLOT = 0x1000        # one page of registers per device (virtio 1.2, 4.2.2)
VIRTIO_MMIO_SLOTS = 64
# ISA IRQs nothing else uses and that stay edge-triggered in the MADT and MP table (the
# irqfd pulses them); devices beyond six share them (Linux's virtio_mmio: IRQF_SHARED).
VIRTIO_MMIO_IRQS = (3, 6, 7, 13, 14, 15)

# --- the legacy PC devices every machine has (pykvm/machine/machine.py wires them) ----
COM1_BASE = 0x3F8           # 8250/16550 UART registers 0x3F8..0x3FF
COM1_LEN = 8
COM1_IRQ = 4                # ISA IRQ 4, as on every PC (Linux's ttyS0)
I8042_BASE = 0x60           # keyboard controller: data 0x60, status/command 0x64
I8042_LEN = 5
I8042_KBD_IRQ = 1
I8042_AUX_IRQ = 12
RTC_BASE = 0x70             # CMOS index 0x70, data 0x71
RTC_LEN = 2

# --- ACPI fixed hardware (the FADT points here; pykvm/devices/acpi_pm.py) ---------
ACPI_PM_BASE = 0x600        # PM1a event block (status, enable: 2+2 ports), then PM1a control
ACPI_PM1A_EVT_BLK = 0x600
ACPI_PM1A_EVT_LEN = 4
ACPI_PM1A_CNT_BLK = 0x604
ACPI_PM1A_CNT_LEN = 2
ACPI_PM_LEN = 8             # ports ACPI_PM_BASE .. +7 belong to the PM device
ACPI_SCI_IRQ = 9            # the SCI: ISA IRQ 9, level-triggered, as on a PIIX4 PC

# --- limits ---------------------------------------------------------------------
MIN_MEM_SIZE = 1 * MiB + 64 * KiB  # a flat guest needs at least its load area
MIN_LINUX_MEM = 64 * MiB
MAX_MEM_SIZE = 1 << 40


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest-physical (start, size) of RAM for a VM of ``mem_size`` bytes.

    RAM that would overlap the 32-bit PCI hole is moved above 4 GiB, as on
    a PC; the total stays ``mem_size``.
    """
    if mem_size <= PCI_HOLE_START:
        return [(0, mem_size)]
    return [(0, PCI_HOLE_START), (FOUR_GiB, mem_size - PCI_HOLE_START)]

# --- pykvm's own guest-control ports ---------------------------------------------
# A guest (the default Linux guest's /init, a tutorial guest) talks to pykvm here.
EXIT_PORT = 0xF4       # byte write: stop the VM, pykvm exits with that status (like isa-debug-exit, but exact)
PROGRESS_PORT = 0xF5   # byte write: a boot milestone, timestamped by pykvm (Firecracker's boot timer)
PROGRESS_INIT_STARTED = 1     # the guest's /init is running
PROGRESS_COMMAND_STARTED = 2  # `pykvm run -- CMD`: output from here on is the command's
PROGRESS_SHELL_STARTED = 3    # an interactive shell is on the console
