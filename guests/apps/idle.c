/* idle: say so, then sleep with interrupts enabled forever (sti; hlt).
 * Output: "idle: dksm guest kit", "idle: ready". */
#include <dksm/kit.h>

DKSM_APP_MAIN
{
    kit_banner("idle");
    kprintf("idle: ready\n");
    cpu_halt_forever_irq();
}
