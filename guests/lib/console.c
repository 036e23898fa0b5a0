/* 16550 UART console on COM1, polled.
 * Each port access is a VM exit, so the driver does no initialisation and
 * only one LSR read per byte in the normal case (THR empty). */
#include <dksm/kit.h>

#define COM1 0x3f8
#define LSR (COM1 + 5)
#define LSR_THRE 0x20
/* Give up waiting after this many polls rather than hang on a VMM that does
 * not model LSR; the byte is written anyway. */
#define POLL_LIMIT 64

void con_putc(char c)
{
    for (int i = 0; i < POLL_LIMIT; i++)
        if (inb(LSR) & LSR_THRE)
            break;
    outb(COM1, (u8)c);
}

void con_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        con_putc(s[i]);
}

void con_puts(const char *s)
{
    while (*s)
        con_putc(*s++);
}

void kit_banner(const char *app)
{
    kprintf("%s: dksm guest kit\n", app);
}
