/* C entry of the kit, called from _dksm_entry on its own stack. */
#include <dksm/kit.h>

void kit_start(const u8 *bp) __noreturn;
void kit_bad_boot(const u8 *bp) __noreturn;

/* "touch=KIB": write one word into each page of KIB KiB of free RAM above 4 MiB,
 * so that the guest holds that much memory the way a running unikernel does (heap,
 * buffers).  Every page gets a different word, mixed with the TSC at boot, so no
 * two pages are equal, in this guest or any other: memory a scanner such as KSM
 * must read again and again and can never merge.  One store per page keeps it
 * cheap where each guest instruction is emulated. */
#define TOUCH_BASE 0x400000UL

static void kit_touch(u64 kib)
{
    struct e820_entry e;
    u64 end = 0;

    for (unsigned i = 0; kit_e820_get(i, &e); i++)
        if (e.type == 1 && e.addr + e.size > end)
            end = e.addr + e.size;
    u64 stop = TOUCH_BASE + kib * 1024;
    if (stop > end)
        stop = end;
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    u64 seed = ((u64)hi << 32 | lo) | 1;
    u64 pages = 0;
    for (u64 p = TOUCH_BASE; p < stop; p += DKSM_PAGE_SIZE, pages++)
        *(volatile u64 *)p = xorshift64(seed + pages);
    kprintf("dksm: touched %lu KiB\n", pages * (DKSM_PAGE_SIZE / 1024));
}

/* An app that returns has finished its work.  It shuts the VM down, unless the
 * command line says "then=idle": then it stays up, halted with interrupts on,
 * which is how fleet experiments keep every kind of app alive. */
void kit_start(const u8 *bp)
{
    const char *then;
    size_t len;

    kit_boot_params = bp;
    u64 touch = kit_cmdline_u64("touch", 0);
    if (touch)
        kit_touch(touch);
    app_main(); /* first byte of the app's text: same address in every app */
    if (kit_cmdline_get("then", &then, &len) && len == 4 && memcmp(then, "idle", 4) == 0) {
        kprintf("dksm: idle\n");
        cpu_halt_forever_irq();
    }
    kit_shutdown();
}

void kit_bad_boot(const u8 *bp)
{
    /* Only look inside if the pointer is within the 1 GiB identity map (the
     * IDT is not installed yet, a fault here would triple-fault). */
    if ((uintptr_t)bp < 0x40000000UL - DKSM_PAGE_SIZE)
        kprintf("dksm: bad boot parameters at %p: header=0x%08x boot_flag=0x%04x"
                " (want HdrS 0x53726448 and 0xaa55)\n",
                bp, *(const u32 *)(bp + BP_HEADER), *(const u16 *)(bp + BP_BOOT_FLAG));
    else
        kprintf("dksm: bad boot parameters pointer %p\n", bp);
    kit_shutdown();
}
