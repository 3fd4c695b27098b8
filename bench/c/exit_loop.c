/*
 * exit_loop.c: the C reference of bench/exits.py.
 *
 * Sets up the VM pykvm's Vm sets up (TSS and identity-map addresses, in-kernel
 * irqchip and PIT, one RAM slot at 0, one vCPU with the supported CPUID), puts
 * the vCPU in 64-bit long mode at ring 0 as pykvm.boot.modes.set_mode does (the
 * same boot GDT at 0x500, identity page tables at 0x9000, RSP 0x8000), loads the
 * same guest bytes, and loops on KVM_RUN handling each port-I/O exit minimally:
 * read the port and the byte, count, enter again. No per-exit timing: only the
 * first exit on PORT and the exit-port write are timestamped.
 *
 *   exit_loop IMAGE LOAD_ADDR MEM_SIZE PORT EXIT_PORT
 *   -> prints "exits=N ns=T cpu_ns=U": N exits on PORT; T ns (monotonic clock) from
 *      the first of them to the write on EXIT_PORT, N round trips (the ring-0
 *      prologue is outside T); U the CPU time the process used in that span (guest
 *      time included), which leaves out the time other processes had the CPU.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define TSS_ADDR 0xFFFBD000UL
#define IDENTITY_MAP_ADDR 0xFFFBC000ULL
#define GDT_ADDR 0x500
#define IDT_ADDR 0x520
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xA000
#define PD_ADDR 0xB000
#define STACK_TOP 0x8000

static void die(const char *what)
{
    fprintf(stderr, "exit_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int xioctl(int fd, unsigned long request, void *arg, const char *what)
{
    int rc = ioctl(fd, request, arg);
    if (rc < 0)
        die(what);
    return rc;
}

static uint64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* pykvm.boot.modes.BOOT_GDT */
static const uint64_t boot_gdt[] = {
    0,
    0x00cf9b000000ffffULL,   /* 0x08: 32-bit code */
    0x00af9b000000ffffULL,   /* 0x10: 64-bit code */
    0x00cf93000000ffffULL,   /* 0x18: data */
    0x00008b0000000067ULL,   /* 0x20: busy TSS */
    0,
};

static void segment(struct kvm_segment *seg, uint16_t selector, int type, int code64)
{
    memset(seg, 0, sizeof *seg);
    seg->base = 0;
    seg->limit = 0xFFFFFFFF;
    seg->selector = selector;
    seg->type = type;
    seg->present = 1;
    seg->s = 1;
    seg->l = code64;
    seg->db = !code64;
    seg->g = 1;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: exit_loop IMAGE LOAD_ADDR MEM_SIZE PORT EXIT_PORT\n");
        return 2;
    }
    const char *image_path = argv[1];
    uint64_t load = strtoull(argv[2], NULL, 0);
    uint64_t mem_size = strtoull(argv[3], NULL, 0);
    unsigned port = strtoul(argv[4], NULL, 0);
    unsigned exit_port = strtoul(argv[5], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    uint64_t identity = IDENTITY_MAP_ADDR;
    ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity);   /* VMX only, as in pykvm */
    xioctl(vm, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    FILE *image = fopen(image_path, "rb");
    if (!image)
        die(image_path);
    size_t image_size = fread(mem + load, 1, mem_size - load, image);
    fclose(image);
    if (image_size == 0) {
        fprintf(stderr, "exit_loop: %s is empty\n", image_path);
        return 1;
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    xioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID");
    xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");

    /* Long mode as pykvm.boot.modes.set_mode(..., "long", load). */
    memcpy(mem + GDT_ADDR, boot_gdt, sizeof boot_gdt);
    memset(mem + IDT_ADDR, 0, 8);
    memset(mem + PML4_ADDR, 0, 0x1000);
    memset(mem + PDPT_ADDR, 0, 0x1000);
    *(uint64_t *)(mem + PML4_ADDR) = PDPT_ADDR | 0x3;
    for (uint64_t dir = 0; dir < 4; dir++) {
        uint64_t *pd = (uint64_t *)(mem + PD_ADDR + dir * 0x1000);
        *(uint64_t *)(mem + PDPT_ADDR + 8 * dir) = (PD_ADDR + dir * 0x1000) | 0x3;
        for (uint64_t i = 0; i < 512; i++)
            pd[i] = ((dir << 30) | (i << 21)) | 0x83;
    }
    struct kvm_sregs sregs;
    xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    segment(&sregs.cs, 0x10, 0xB, 1);
    segment(&sregs.ds, 0x18, 0x3, 0);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    memset(&sregs.tr, 0, sizeof sregs.tr);
    sregs.tr.selector = 0x20;
    sregs.tr.limit = 0x67;
    sregs.tr.type = 0xB;
    sregs.tr.present = 1;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = sizeof boot_gdt - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cr0 |= 0x1 | 0x10 | 0x20 | 0x80000000UL;     /* PE ET NE PG */
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20;                                   /* PAE */
    sregs.efer |= 0x100 | 0x400;                         /* LME LMA */
    xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rflags = 0x2;
    regs.rip = load;
    regs.rsp = STACK_TOP;
    xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

    /* The measured loop. */
    uint64_t exits = 0, first = 0, last = 0, first_cpu = 0, last_cpu = 0;
    volatile uint8_t sink = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "exit_loop: unexpected exit reason %u after %llu exits\n",
                    run->exit_reason, (unsigned long long)exits);
            return 1;
        }
        uint16_t io_port = run->io.port;
        if (io_port == port) {
            sink = *((uint8_t *)run + run->io.data_offset);
            if (exits++ == 0) {
                first = clock_ns(CLOCK_MONOTONIC);
                first_cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
            }
        } else if (io_port == exit_port) {
            last = clock_ns(CLOCK_MONOTONIC);
            last_cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
            break;
        } else {
            fprintf(stderr, "exit_loop: unexpected port %#x\n", io_port);
            return 1;
        }
    }
    (void)sink;
    printf("exits=%llu ns=%llu cpu_ns=%llu\n", (unsigned long long)exits,
           (unsigned long long)(last - first), (unsigned long long)(last_cpu - first_cpu));
    return 0;
}
