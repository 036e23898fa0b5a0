/* echo: read lines from the serial console, interrupt-driven, and echo them back.
 *
 * The guest programs the 8259 PIC (vectors 32-47), unmasks only IRQ 4 (COM1),
 * enables the UART's received-data interrupt, then sleeps with "sti; hlt" until an
 * interrupt arrives: without the VMM raising IRQ 4 for input, it would sleep for
 * ever.  After each wake-up it drains the receiver (LSR bit 0).  A line "quit" ends
 * the app.
 *
 * Output (parsed by tests):
 *   echo: dksm guest kit
 *   echo: ready
 *   echo: got "<line>"                       (one per line received, CR or LF ends it)
 *   echo: bye after <bytes> bytes, <wakeups> wakeups
 */
#include <dksm/kit.h>

#define COM1 0x3f8
#define COM1_IER (COM1 + 1)
#define COM1_MCR (COM1 + 4)
#define COM1_LSR (COM1 + 5)
#define LSR_DATA_READY 0x01
#define IER_RECEIVED_DATA 0x01
#define MCR_DTR_RTS_OUT2 0x0b
#define LINE_MAX 200

static void pic_route_only_irq4(void)
{
    outb(0x20, 0x11); /* ICW1: initialise, ICW4 follows */
    outb(0xa0, 0x11);
    outb(0x21, 0x20); /* ICW2: IRQ 0-7 -> vectors 32-39 */
    outb(0xa1, 0x28); /* IRQ 8-15 -> 40-47 */
    outb(0x21, 0x04); /* ICW3: slave on IRQ 2 */
    outb(0xa1, 0x02);
    outb(0x21, 0x01); /* ICW4: 8086 mode */
    outb(0xa1, 0x01);
    outb(0x21, (u8)~(1u << 4));
    outb(0xa1, 0xff);
}

DKSM_APP_MAIN
{
    char line[LINE_MAX + 1];
    size_t len = 0;
    u64 bytes = 0, wakeups = 0;

    kit_banner("echo");
    pic_route_only_irq4();
    outb(COM1_MCR, MCR_DTR_RTS_OUT2);
    outb(COM1_IER, IER_RECEIVED_DATA);
    kprintf("echo: ready\n");
    for (;;) {
        while (inb(COM1_LSR) & LSR_DATA_READY) {
            char c = (char)inb(COM1);
            bytes++;
            if (c == '\r' || c == '\n') {
                if (len == 0)
                    continue;
                line[len] = 0;
                kprintf("echo: got \"%s\"\n", line);
                if (len == 4 && memcmp(line, "quit", 4) == 0) {
                    outb(COM1_IER, 0);
                    kprintf("echo: bye after %lu bytes, %lu wakeups\n", bytes, wakeups);
                    return;
                }
                len = 0;
            } else if (len < LINE_MAX) {
                line[len++] = c;
            }
        }
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        wakeups++;
    }
}
