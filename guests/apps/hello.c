/* hello: print the command line and the e820 map, then power off (or idle, with then=idle).
 *
 * Output (parsed by tests):
 *   hello: dksm guest kit
 *   hello: cmdline="<command line>"
 *   hello: e820 <N> entries
 *   e820: 0x<addr, 16 hex digits>-0x<addr+size-1, 16 hex digits> type <type>   (N lines)
 *   hello: bye
 */
#include <dksm/kit.h>

DKSM_APP_MAIN
{
    size_t n;
    struct e820_entry e;

    kit_banner("hello");
    const char *cmd = kit_cmdline(&n);
    kprintf("hello: cmdline=\"%.*s\"\n", (int)n, cmd);
    unsigned count = kit_e820_count();
    kprintf("hello: e820 %u entries\n", count);
    for (unsigned i = 0; kit_e820_get(i, &e); i++)
        kprintf("e820: 0x%016lx-0x%016lx type %u\n", e.addr, e.addr + e.size - 1, e.type);
    kprintf("hello: bye\n");
    /* returning shuts down, or idles with then=idle (kit_start) */
}
