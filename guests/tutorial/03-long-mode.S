# 03-long-mode.S - from 32-bit protected mode into 64-bit long mode: page
# tables, PAE, EFER.LME, paging, and a far jump into 64-bit code.
#
#   python3 -m pykvm run --flat guests/tutorial/build/03-long-mode.bin --entry protected
#
# Why start in protected mode and not in real mode like 02? Because 02 already
# showed that step, and because this is where a real 64-bit kernel starts
# too: GRUB (multiboot) and Linux's 32-bit boot protocol both hand over in flat
# 32-bit protected mode with paging off. `--entry protected` makes pykvm do
# that hand-over: flat 4 GiB segments from its own boot GDT, interrupts off,
# no IDT, paging off, EIP = 0x10000. Everything after that is this file's job.
#
# Long mode cannot run without paging, so the first task is a set of page
# tables. Here they are plain data in the image (see the end of the file):
# they map the first 1 GiB of virtual addresses onto the same physical
# addresses ("identity mapping"), so code keeps running at the same address
# when paging switches on.
#
# Who runs what:
#   guest mode - the ordinary instructions, and the page-table walks of every
#                memory access once paging is on (on VT-x/AMD-V the CPU walks
#                the guest's tables and then KVM's EPT/NPT tables in hardware).
#                kvm_pvm: all of this is ring 0, so it is emulated in the kernel.
#   KVM        - the CR3, CR4, CR0 writes and `wrmsr` to EFER: each traps out
#                of guest mode and KVM finishes it in the kernel (it must know
#                the guest's paging mode to build its own view of guest memory).
#                pykvm sees none of them.
#   pykvm      - the `out`s: two lines of text and the exit port.

.include "tutorial.inc"

.set CODE64_SEL, 0x08           # selectors in *our* GDT (below), not pykvm's boot GDT
.set DATA_SEL,   0x10

.set CR0_PG,    1 << 31         # paging
.set CR4_PAE,   1 << 5          # physical address extension: 64-bit page-table entries
.set MSR_EFER,  0xc0000080      # extended feature enable register
.set EFER_LME,  1 << 8          # long mode enable (takes effect when paging turns on)

.set PTE_PRESENT,  1 << 0
.set PTE_WRITABLE, 1 << 1
.set PTE_HUGE,     1 << 7       # in a page directory: this entry maps a 2 MiB page

    .text
    .globl _start

# --- 32-bit protected mode, paging off ----------------------------------------------
    .code32
_start:
    cld
    mov     $pm_msg, %esi
    COM1_PUTS

    # Our own GDT, with a 64-bit code segment. The loader's GDT is not ours to
    # rely on (multiboot says so explicitly). Loading GDTR changes nothing
    # yet: CS and DS keep the descriptors they cached until they are reloaded.
    lgdt    gdt_descriptor

    # 1. CR3 = the physical address of the top-level table (PML4).
    mov     $pml4, %eax
    mov     %eax, %cr3

    # 2. PAE: long mode uses the 64-bit page-table entry format.
    mov     %cr4, %eax
    or      $CR4_PAE, %eax
    mov     %eax, %cr4

    # 3. EFER.LME: ask for long mode. MSRs are read and written through
    #    ECX = MSR number, EDX:EAX = value.
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr

    # 4. Paging on. With LME set, the CPU now enters long mode and sets
    #    EFER.LMA - but in "compatibility mode", since CS is still the
    #    32-bit segment it cached.
    mov     %cr0, %eax
    or      $CR0_PG, %eax
    mov     %eax, %cr0

    # 5. Far jump to a segment whose descriptor has L = 1: 64-bit mode.
    ljmp    $CODE64_SEL, $long_entry

# --- 64-bit long mode ------------------------------------------------------------------
    .code64
long_entry:
    # In 64-bit mode the CPU ignores the bases and limits of DS, ES, SS (only
    # FS and GS keep a base), but loading them with a valid selector is tidy.
    mov     $DATA_SEL, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    lea     stack_top(%rip), %rsp

    # RIP-relative addressing: new in 64-bit mode, the natural way to find data.
    lea     long_msg(%rip), %rsi
    COM1_PUTS

    EXIT_VM 0

1:  cli
    hlt
    jmp     1b

# --- data ----------------------------------------------------------------------------------
pm_msg:
    .asciz  "protected mode: enabling paging and long mode\n"
long_msg:
    .asciz  "Hello from 64-bit long mode!\n"

    .balign 8
gdt:
    .quad   0                                       # 0x00: null
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x9a, 0xa        # 0x08: code, ring 0, 64-bit (L)
    SEGMENT_DESCRIPTOR 0, 0xfffff, 0x92, 0xc        # 0x10: data, ring 0
gdt_end:
gdt_descriptor:
    .word   gdt_end - gdt - 1
    .long   gdt                 # lgdt in 32-bit code takes a 32-bit base

    .balign 16
    .fill   256, 1, 0
stack_top:

# The page tables: a 4-level tree, each table one 4 KiB page of 512 eight-byte
# entries, each entry the physical address of the next level plus flag bits.
# A virtual address is cut into 9-bit indexes (PML4, PDPT, PD) and a 21-bit
# offset within a 2 MiB page. We fill in one path: PML4[0] -> PDPT[0] -> one
# page directory whose 512 entries map 512 x 2 MiB = the first 1 GiB.
    .balign 4096                # the CPU requires page-aligned tables
pml4:
    .quad   pdpt + PTE_PRESENT + PTE_WRITABLE       # covers virtual 0 .. 512 GiB
    .fill   511, 8, 0
pdpt:
    .quad   page_directory + PTE_PRESENT + PTE_WRITABLE   # covers 0 .. 1 GiB
    .fill   511, 8, 0
page_directory:
    .set    address, 0
    .rept   512                 # entry i maps virtual i * 2 MiB to physical i * 2 MiB
    .quad   address + PTE_PRESENT + PTE_WRITABLE + PTE_HUGE
    .set    address, address + 0x200000
    .endr
