/* C entry of the kit, called from _dksm_entry on its own stack. */
#include <dksm/kit.h>

void kit_start(const u8 *bp) __noreturn;
void kit_bad_boot(const u8 *bp) __noreturn;

/* An app that returns has finished its work.  It shuts the VM down, unless the
 * command line says "then=idle": then it stays up, halted with interrupts on,
 * which is how fleet experiments keep every kind of app alive. */
void kit_start(const u8 *bp)
{
    const char *then;
    size_t len;

    kit_boot_params = bp;
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
