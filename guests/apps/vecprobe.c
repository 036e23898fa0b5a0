/* vecprobe: what a stock-compiled unikernel asks of the CPU's vector unit.
 *
 * Built like sseprobe without -mgeneral-regs-only (-O2 -msse2), so gcc
 * vectorises the loops below on its own: a memset, a memcpy, an integer hash
 * with a 32-bit multiply (pmuludq and shuffles), 16-bit multiplies (pmullw),
 * 64-bit adds (paddq), a byte count (pcmpeqb) and a saturating narrowing
 * (packuswb).  It also runs by hand the state instructions unikernels run at
 * boot and on context switches: ldmxcsr/stmxcsr, xgetbv, fxsave and
 * xsaveopt/xrstor.  On a PVM host each of those is executed by the VMM's
 * emulation fallback; a test recomputes every printed value in Python.
 *
 * Inputs: one splitmix64 stream (seed 0x76656370726f6265, "vecprobe") fills,
 * in this order, src (1024 bytes, 8 per draw, little-endian), words_a and
 * words_b (256 u16 each, the low 16 bits of one draw each), dwords (256 u32,
 * low 32 bits), qwords (128 u64), shorts (256 s16, low 16 bits).
 *
 * Output (every value hex, 16 digits unless noted):
 *   vecprobe: dksm guest kit
 *   vecprobe: mxcsr=0x00007f80                  (after ldmxcsr of 0x7f80)
 *   vecprobe: fxsave mxcsr=0x00007f80 xmm5=<hi><lo>   (fields of the fxsave image)
 *   vecprobe: xcr0=0x<16 hex>                   (xgetbv after setting x87|SSE; or "none")
 *   vecprobe: xrstor xmm6=<hi><lo> xmm7=<hi><lo> xstate_bv=0x<16 hex>
 *   vecprobe: memset=0x<fnv1a64 of dst after memset to 0xa5>
 *   vecprobe: memcpy=0x<fnv1a64 of dst after copying src>
 *   vecprobe: hash32=0x<8 hex digits>
 *   vecprobe: mul16=0x<fnv1a64 of the 256 products, little-endian u16>
 *   vecprobe: add64=0x<fnv1a64 of qwords[i] + qwords[i + 64], i < 64, little-endian>
 *   vecprobe: count=<decimal count of 0x5a bytes in src>
 *   vecprobe: clamp=0x<fnv1a64 of the 256 clamped bytes>
 *   vecprobe: done
 */
#include <dksm/kit.h>

#define BYTES 1024
#define WORDS 256
#define DWORDS 256
#define QWORDS 128
#define SEED 0x76656370726f6265UL
#define MXCSR_TEST 0x7f80U /* all exceptions masked, round toward zero */
#define MXCSR_DEFAULT 0x1f80U
#define CR4_OSFXSR (1UL << 9)
#define CR4_OSXMMEXCPT (1UL << 10)
#define CR4_OSXSAVE (1UL << 18)
#define CPUID1_ECX_XSAVE (1U << 26)

static u8 src[BYTES] __aligned(16);
static u8 dst[BYTES] __aligned(16);
static u16 words_a[WORDS] __aligned(16);
static u16 words_b[WORDS] __aligned(16);
static u16 products[WORDS] __aligned(16);
static u32 dwords[DWORDS] __aligned(16);
static u64 qwords[QWORDS] __aligned(16);
static u64 sums[QWORDS / 2] __aligned(16);
static s16 shorts[WORDS] __aligned(16);
static u8 clamped[WORDS] __aligned(16);
static u8 fx_area[512] __aligned(16);
static u8 xs_area[1024] __aligned(64);
static const u64 pattern[4] __aligned(16) = {
    0x0011223344556677UL, 0x8899aabbccddeeffUL, 0x0123456789abcdefUL, 0xfedcba9876543210UL,
};

static void fill_inputs(void)
{
    u64 state = SEED;
    for (int i = 0; i < BYTES; i += 8) {
        u64 v = splitmix64(&state);
        for (int j = 0; j < 8; j++)
            src[i + j] = (u8)(v >> (8 * j));
    }
    for (int i = 0; i < WORDS; i++)
        words_a[i] = (u16)splitmix64(&state);
    for (int i = 0; i < WORDS; i++)
        words_b[i] = (u16)splitmix64(&state);
    for (int i = 0; i < DWORDS; i++)
        dwords[i] = (u32)splitmix64(&state);
    for (int i = 0; i < QWORDS; i++)
        qwords[i] = splitmix64(&state);
    for (int i = 0; i < WORDS; i++)
        shorts[i] = (s16)splitmix64(&state);
}

/* The loops gcc vectorises: fixed trip counts and aligned arrays, so even its
 * cheapest cost model (the -O2 default) replaces them whole with SSE2 code. */
__attribute__((noinline)) static void vec_memset(u8 value)
{
    for (int i = 0; i < BYTES; i++)
        dst[i] = value;
}

__attribute__((noinline)) static void vec_memcpy(void)
{
    for (int i = 0; i < BYTES; i++)
        dst[i] = src[i];
}

__attribute__((noinline)) static u32 vec_hash32(void)
{
    u32 acc = 0;
    for (int i = 0; i < DWORDS; i++) {
        u32 v = dwords[i];
        v ^= v >> 15;
        v *= 0x2c1b3c6dU;
        v ^= v >> 12;
        acc += v;
    }
    return acc;
}

__attribute__((noinline)) static void vec_mul16(void)
{
    for (int i = 0; i < WORDS; i++)
        products[i] = (u16)((u32)words_a[i] * words_b[i] + 7);
}

__attribute__((noinline)) static void vec_add64(void)
{
    for (int i = 0; i < QWORDS / 2; i++)
        sums[i] = qwords[i] + qwords[i + QWORDS / 2];
}

__attribute__((noinline)) static u32 vec_count(u8 wanted)
{
    u32 count = 0;
    for (int i = 0; i < BYTES; i++)
        count += src[i] == wanted;
    return count;
}

__attribute__((noinline)) static void vec_clamp(void)
{
    for (int i = 0; i < WORDS; i++) {
        s16 v = shorts[i];
        clamped[i] = (u8)(v < 0 ? 0 : v > 255 ? 255 : v);
    }
}

static void cpuid(u32 leaf, u32 *eax, u32 *ebx, u32 *ecx, u32 *edx)
{
    __asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}

static u64 load_u64(const u8 *p)
{
    u64 v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void probe_mxcsr_and_fxsave(void)
{
    u32 in = MXCSR_TEST, out = 0;
    __asm__ volatile("ldmxcsr %1\n\t"
                     "stmxcsr %0"
                     : "=m"(out)
                     : "m"(in));
    kprintf("vecprobe: mxcsr=0x%08x\n", out);
    __asm__ volatile("movdqa %1, %%xmm5\n\t"
                     "fxsave %0"
                     : "=m"(fx_area)
                     : "m"(pattern[0])
                     : "xmm5");
    u32 saved = (u32)load_u64(fx_area + 24);
    kprintf("vecprobe: fxsave mxcsr=0x%08x xmm5=%016lx%016lx\n", saved,
            load_u64(fx_area + 160 + 5 * 16 + 8), load_u64(fx_area + 160 + 5 * 16));
    in = MXCSR_DEFAULT;
    __asm__ volatile("ldmxcsr %0" : : "m"(in));
}

static void probe_xsave(void)
{
    u32 eax, ebx, ecx, edx;
    cpuid(1, &eax, &ebx, &ecx, &edx);
    if (!(ecx & CPUID1_ECX_XSAVE)) {
        kprintf("vecprobe: xcr0=none\n");
        return;
    }
    write_cr4(read_cr4() | CR4_OSXSAVE);
    /* x87 | SSE: xsetbv is run by the host's KVM; xgetbv is not. */
    __asm__ volatile("xsetbv" : : "c"(0), "a"(3), "d"(0));
    u32 lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    kprintf("vecprobe: xcr0=0x%016lx\n", ((u64)hi << 32) | lo);
    u64 out[4] __aligned(16);
    /* Save xmm6/xmm7, clobber them, restore them, read them back: all in one
     * asm statement so the compiler cannot use the registers in between. */
    __asm__ volatile("movdqa 0(%[pat]), %%xmm6\n\t"
                     "movdqa 16(%[pat]), %%xmm7\n\t"
                     "xsaveopt (%[area])\n\t"
                     "pxor %%xmm6, %%xmm6\n\t"
                     "pcmpeqb %%xmm7, %%xmm7\n\t"
                     "xrstor (%[area])\n\t"
                     "movdqa %%xmm6, 0(%[out])\n\t"
                     "movdqa %%xmm7, 16(%[out])"
                     :
                     : [pat] "r"(pattern), [area] "r"(xs_area), [out] "r"(out), "a"(3), "d"(0)
                     : "xmm6", "xmm7", "memory");
    kprintf("vecprobe: xrstor xmm6=%016lx%016lx xmm7=%016lx%016lx xstate_bv=0x%016lx\n", out[1],
            out[0], out[3], out[2], load_u64(xs_area + 512));
}

DKSM_APP_MAIN
{
    kit_banner("vecprobe");
    write_cr4(read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT);
    fill_inputs();
    probe_mxcsr_and_fxsave();
    probe_xsave();
    vec_memset(0xa5);
    kprintf("vecprobe: memset=0x%016lx\n", fnv1a64(FNV64_OFFSET, dst, BYTES));
    vec_memcpy();
    kprintf("vecprobe: memcpy=0x%016lx\n", fnv1a64(FNV64_OFFSET, dst, BYTES));
    kprintf("vecprobe: hash32=0x%08x\n", vec_hash32());
    vec_mul16();
    kprintf("vecprobe: mul16=0x%016lx\n", fnv1a64(FNV64_OFFSET, products, sizeof(products)));
    vec_add64();
    kprintf("vecprobe: add64=0x%016lx\n", fnv1a64(FNV64_OFFSET, sums, sizeof(sums)));
    kprintf("vecprobe: count=%u\n", vec_count(0x5a));
    vec_clamp();
    kprintf("vecprobe: clamp=0x%016lx\n", fnv1a64(FNV64_OFFSET, clamped, sizeof(clamped)));
    kprintf("vecprobe: done\n");
}
