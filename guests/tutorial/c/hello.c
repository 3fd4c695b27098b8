/* hello.c - lesson 6: a guest in C, compiled by the system's gcc.
 *
 *   make guests
 *   python3 -m pykvm run --flat guests/tutorial/build/c-hello.bin --entry long --stats
 *
 * No operating system and no libc: "freestanding" C. pykvm enters it in 64-bit
 * long mode (`--entry long`: identity-mapped paging, flat segments, a stack at
 * 0x8000), so the C compiler's ordinary 64-bit code runs as it is. All it needs
 * from the machine is a way to talk: two one-instruction helpers, `outb` to a
 * port and `inb` from one, and the UART and pykvm's exit port behind them.
 * Each `outb` to COM1 is one exit to pykvm, exactly as in the assembly guests.
 */

#include <stdint.h>

#define COM1      0x3f8
#define COM1_LSR  0x3fd        /* line status register */
#define LSR_THRE  0x20         /* transmitter holding register empty */
#define EXIT_PORT 0xf4         /* pykvm: stop the VM with this status */

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static void putc_serial(char c)
{
    while (!(inb(COM1_LSR) & LSR_THRE))   /* a real 16550 needs the wait; pykvm's is always ready */
        ;
    outb(COM1, (uint8_t)c);
}

static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static void put_decimal(uint64_t n)
{
    char digits[20];
    int i = 0;
    do {
        digits[i++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    while (i)
        putc_serial(digits[--i]);
}

static uint64_t fibonacci(unsigned n)
{
    uint64_t a = 0, b = 1;
    while (n--) {
        uint64_t next = a + b;
        a = b;
        b = next;
    }
    return a;
}

__attribute__((section(".text.start"), noreturn)) void _start(void)
{
    puts_serial("Hello from C!\n");
    puts_serial("fibonacci(50) = ");
    put_decimal(fibonacci(50));
    putc_serial('\n');
    outb(EXIT_PORT, 0);
    for (;;)
        __asm__ volatile("cli; hlt");
}
