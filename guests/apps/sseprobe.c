/* sseprobe: the one image that uses SSE on purpose.  On PVM hosts the
 * host-side instruction emulator does not know SSE, so this exercises a
 * VMM's emulation fallback; on VMX/SVM hosts it just runs.  Only this file
 * is built without -mgeneral-regs-only (with -msse2); the library part is
 * the same no-SSE code as in every other image.
 *
 * It sets CR4.OSFXSR and CR4.OSXMMEXCPT (required before any SSE
 * instruction), then runs a few SSE2 integer instructions seen in real
 * unikernels, each on fixed inputs, and prints the low 64 bits of the result:
 *
 *   sseprobe: dksm guest kit
 *   sseprobe: paddq=0x1234567812345678     (0x1111111111111111 + 0x0123456701234567)
 *   sseprobe: pxor=0x0000000000000000      (x ^ x)
 *   sseprobe: punpcklbw=0xdd44cc33bb22aa11 (see below)
 *   sseprobe: pshufd=0x0123456789abcdef    (dwords swapped: 0x89abcdef01234567 -> 0x0123456789abcdef)
 *   sseprobe: done
 *
 * punpcklbw: xmm0 = 0x00000000000000000000000044332211 (low bytes 11 22 33 44)
 *            xmm1 = 0x000000000000000000000000ddccbbaa (low bytes aa bb cc dd)
 *            punpcklbw xmm1, xmm0 -> bytes 11 aa 22 bb 33 cc 44 dd
 *            -> low u64 0xdd44cc33bb22aa11.
 * A correct fallback prints exactly what real hardware prints.
 */
#include <dksm/kit.h>

static u64 sse_paddq(u64 a, u64 b)
{
    u64 r;
    __asm__ volatile("movq %1, %%xmm0\n\t"
                     "movq %2, %%xmm1\n\t"
                     "paddq %%xmm1, %%xmm0\n\t"
                     "movq %%xmm0, %0"
                     : "=r"(r)
                     : "r"(a), "r"(b)
                     : "xmm0", "xmm1");
    return r;
}

static u64 sse_pxor(u64 a)
{
    u64 r;
    __asm__ volatile("movq %1, %%xmm2\n\t"
                     "pxor %%xmm2, %%xmm2\n\t"
                     "movq %%xmm2, %0"
                     : "=r"(r)
                     : "r"(a)
                     : "xmm2");
    return r;
}

static u64 sse_punpcklbw(u32 a, u32 b)
{
    u64 r;
    __asm__ volatile("movd %1, %%xmm0\n\t"
                     "movd %2, %%xmm1\n\t"
                     "punpcklbw %%xmm1, %%xmm0\n\t"
                     "movq %%xmm0, %0"
                     : "=r"(r)
                     : "r"(a), "r"(b)
                     : "xmm0", "xmm1");
    return r;
}

static u64 sse_pshufd(u64 a)
{
    u64 r;
    __asm__ volatile("movq %1, %%xmm3\n\t"
                     "pshufd $0xe1, %%xmm3, %%xmm4\n\t"
                     "movq %%xmm4, %0"
                     : "=r"(r)
                     : "r"(a)
                     : "xmm3", "xmm4");
    return r;
}

DKSM_APP_MAIN
{
    kit_banner("sseprobe");
    write_cr4(read_cr4() | (1UL << 9) | (1UL << 10)); /* OSFXSR | OSXMMEXCPT */
    kprintf("sseprobe: paddq=0x%016lx\n", sse_paddq(0x1111111111111111UL, 0x0123456701234567UL));
    kprintf("sseprobe: pxor=0x%016lx\n", sse_pxor(0x5555aaaa5555aaaaUL));
    kprintf("sseprobe: punpcklbw=0x%016lx\n", sse_punpcklbw(0x44332211U, 0xddccbbaaU));
    kprintf("sseprobe: pshufd=0x%016lx\n", sse_pshufd(0x89abcdef01234567UL));
    kprintf("sseprobe: done\n");
    /* returning shuts down, or idles with then=idle (kit_start) */
}
