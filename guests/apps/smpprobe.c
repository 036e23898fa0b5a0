/* smpprobe: start every CPU the MP table lists, the way a PC operating system does,
 * and have them all count on one shared counter.
 *
 * The bootstrap processor finds the MP floating pointer ("_MP_") in the EBDA's
 * first KiB (0x9fc00), reads the processor entries, copies a real-mode trampoline
 * to 0x6000 and starts each application processor with INIT and a start-up IPI
 * (vector 6) through its x2APIC.  The trampoline goes from real mode to protected
 * mode to long mode on the VMM's page tables (CR3 0x9000) and calls ap_main on a
 * stack of its own.  Every CPU then adds 1 to a shared counter ROUNDS times with
 * locked instructions, adds 1 to a shared 128-bit counter WIDE_ROUNDS times (even
 * CPUs with lock cmpxchg16b, which a PVM host's KVM leaves to the VMM; odd CPUs with
 * lock incq on its low half, which KVM runs itself: the VMM's compare-exchange must be
 * atomic against them), and reports its APIC id three ways (x2APIC id register,
 * CPUID leaf 1 EBX[31:24], CPUID leaf 0xB EDX).
 *
 * Output (parsed by tests):
 *   smpprobe: dksm guest kit
 *   smpprobe: mp table lists <N> cpus
 *   smpprobe: cpu <i> apic <id> cpuid <id> x2apic <id> online      (N lines, any order)
 *   smpprobe: <N> cpus online, counter <N*ROUNDS> ok, wide <N*WIDE_ROUNDS> ok
 *   (MISMATCH instead of ok where a counter is wrong)
 * or "smpprobe: cpu <i> did not start" / "smpprobe: no MP table" on failure.
 */
#include <dksm/kit.h>

#define MP_SCAN_START 0x9fc00UL
#define MP_SCAN_END 0xa0000UL
#define TRAMPOLINE 0x6000UL
#define SIPI_VECTOR (TRAMPOLINE >> 12)
#define MAX_CPUS 32
#define AP_STACK_SIZE 8192
#define ROUNDS 1000
#define WIDE_ROUNDS 50
#define INC_ROUNDS 20000 /* odd CPUs hammer the low half while even ones compare-exchange */
#define START_SPINS 2000000UL

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1UL << 11)
#define APIC_BASE_X2APIC (1UL << 10)
#define MSR_X2APIC_ID 0x802
#define MSR_X2APIC_ICR 0x830
#define ICR_INIT 0x4500 /* INIT, level assert */
#define ICR_STARTUP 0x4600

extern char smp_trampoline_start[], smp_trampoline_end[];
extern char smp_trampoline_stack[], smp_trampoline_entry[];
extern const u8 dksm_idtr[];

static u8 ap_stacks[MAX_CPUS][AP_STACK_SIZE] __aligned(16);
static volatile u64 counter;
static volatile u64 wide[2] __aligned(16); /* low, high */
static volatile u32 started;
static volatile u32 arrived;
static volatile u32 print_lock;
static volatile u32 go; /* set once every CPU is up: they then count at the same time */

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (u64)hi << 32 | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static void locked_print_begin(void)
{
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
}

static void locked_print_end(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static u32 x2apic_enable(void)
{
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    return (u32)rdmsr(MSR_X2APIC_ID);
}

/* wide += 1 as one 128-bit compare-exchange, retried until no other CPU intervened. */
static void add_wide(void)
{
    u64 lo = wide[0], hi = wide[1];
    u8 swapped;
    do {
        u64 new_lo = lo + 1, new_hi = hi + (new_lo == 0);
        __asm__ volatile("lock cmpxchg16b %[mem]; setz %[ok]"
                         : [mem] "+m"(*(volatile u64(*)[2])wide), "+a"(lo), "+d"(hi), [ok] "=q"(swapped)
                         : "b"(new_lo), "c"(new_hi)
                         : "cc", "memory");
    } while (!swapped);
}

static void count_and_report(unsigned index)
{
    u32 r[4];
    u32 apic = x2apic_enable();
    cpuid(1, 0, r);
    u32 leaf1 = r[1] >> 24;
    cpuid(0xb, 0, r);
    u32 topology = r[3];
    for (int i = 0; i < ROUNDS; i++)
        __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    if (index % 2 == 0)
        for (int i = 0; i < WIDE_ROUNDS; i++)
            add_wide();
    else
        for (int i = 0; i < INC_ROUNDS; i++)
            __asm__ volatile("lock incq %0" : "+m"(wide[0]) : : "cc", "memory");
    locked_print_begin();
    kprintf("smpprobe: cpu %u apic %u cpuid %u x2apic %u online\n", index, apic, leaf1, topology);
    locked_print_end();
}

/* Called by the trampoline, on the AP's own stack, interrupts off. */
void ap_main(void) __noreturn;
void ap_main(void)
{
    __asm__ volatile("lidt (%0)" : : "r"(dksm_idtr) : "memory"); /* the kit's IDT */
    unsigned index = __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    while (!go)
        cpu_relax();
    count_and_report(index);
    __atomic_fetch_add(&arrived, 1, __ATOMIC_SEQ_CST);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static const u8 *find_mp_floating_pointer(void)
{
    for (uintptr_t p = MP_SCAN_START; p + 16 <= MP_SCAN_END; p += 16) {
        const u8 *f = (const u8 *)p;
        if (memcmp(f, "_MP_", 4) != 0)
            continue;
        u8 sum = 0;
        for (int i = 0; i < 16; i++)
            sum += f[i];
        if (sum == 0)
            return f;
    }
    return NULL;
}

/* APIC ids of the enabled processors, BSP first; returns how many. */
static unsigned mp_processors(u8 ids[MAX_CPUS])
{
    const u8 *fp = find_mp_floating_pointer();
    if (fp == NULL)
        return 0;
    const u8 *table = (const u8 *)(uintptr_t) * (const u32 *)(fp + 4);
    if (memcmp(table, "PCMP", 4) != 0)
        return 0;
    u16 length = *(const u16 *)(table + 4);
    u8 sum = 0;
    for (u16 i = 0; i < length; i++)
        sum += table[i];
    if (sum != 0)
        return 0;
    unsigned n = 1;
    const u8 *e = table + 44;
    while (e < table + length) {
        if (e[0] == 0) { /* processor: id, version, flags (1 enabled, 2 bootstrap) */
            if (e[3] & 2)
                ids[0] = e[1];
            else if ((e[3] & 1) && n < MAX_CPUS)
                ids[n++] = e[1];
            e += 20;
        } else {
            e += 8;
        }
    }
    return n;
}

static int start_ap(unsigned index, u8 apic)
{
    u32 before = started;
    *(u64 *)(TRAMPOLINE + (smp_trampoline_stack - smp_trampoline_start)) =
        (u64)(uintptr_t)&ap_stacks[index][AP_STACK_SIZE];
    *(u64 *)(TRAMPOLINE + (smp_trampoline_entry - smp_trampoline_start)) = (u64)(uintptr_t)ap_main;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    wrmsr(MSR_X2APIC_ICR, (u64)apic << 32 | ICR_INIT);
    for (int attempt = 0; attempt < 2; attempt++) {
        wrmsr(MSR_X2APIC_ICR, (u64)apic << 32 | ICR_STARTUP | SIPI_VECTOR);
        for (u64 spin = 0; spin < START_SPINS; spin++) {
            if (started != before)
                return 1;
            cpu_relax();
        }
    }
    return 0;
}

DKSM_APP_MAIN
{
    u8 ids[MAX_CPUS];

    kit_banner("smpprobe");
    unsigned n = mp_processors(ids);
    if (n == 0) {
        kprintf("smpprobe: no MP table\n");
        return;
    }
    kprintf("smpprobe: mp table lists %u cpus\n", n);
    x2apic_enable(); /* the start-up IPIs go through the BSP's x2APIC */
    memcpy((void *)TRAMPOLINE, smp_trampoline_start, (size_t)(smp_trampoline_end - smp_trampoline_start));
    for (unsigned i = 1; i < n; i++) {
        if (!start_ap(i, ids[i])) {
            kprintf("smpprobe: cpu %u did not start\n", i);
            return;
        }
    }
    __atomic_store_n(&go, 1, __ATOMIC_SEQ_CST);
    count_and_report(0);
    while (arrived != n - 1)
        cpu_relax();
    u64 expected = (u64)n * ROUNDS;
    u64 wide_expected = (u64)((n + 1) / 2) * WIDE_ROUNDS + (u64)(n / 2) * INC_ROUNDS;
    kprintf("smpprobe: %u cpus online, counter %lu %s, wide %lu %s\n", n, counter,
            counter == expected ? "ok" : "MISMATCH", wide[0],
            wide[0] == wide_expected && wide[1] == 0 ? "ok" : "MISMATCH");
}

/* The application processors' way from real mode to ap_main, copied to TRAMPOLINE
 * (below the zero page, outside every structure the VMM writes).  Its own GDT
 * lives inside it: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18). */
__asm__(
    "    .section .text.smpprobe.trampoline, \"ax\", @progbits\n"
    "    .globl smp_trampoline_start, smp_trampoline_end\n"
    "    .globl smp_trampoline_stack, smp_trampoline_entry\n"
    "    .code16\n"
    "smp_trampoline_start:\n"
    "    cli\n"
    "    cld\n"
    "    movw %cs, %ax\n"
    "    movw %ax, %ds\n"
    "    lgdtl smp_gdt_pointer - smp_trampoline_start\n"
    "    movl %cr0, %eax\n"
    "    orl $1, %eax\n"
    "    movl %eax, %cr0\n"
    "    ljmpl $0x18, $(0x6000 + smp_protected - smp_trampoline_start)\n"
    "    .code32\n"
    "smp_protected:\n"
    "    movw $0x10, %ax\n"
    "    movw %ax, %ds\n"
    "    movw %ax, %es\n"
    "    movw %ax, %ss\n"
    "    movl %cr4, %eax\n"
    "    orl $0x20, %eax\n" /* PAE */
    "    movl %eax, %cr4\n"
    "    movl $0x9000, %eax\n" /* the VMM's identity map of 0-1 GiB */
    "    movl %eax, %cr3\n"
    "    movl $0xc0000080, %ecx\n" /* EFER.LME */
    "    rdmsr\n"
    "    orl $0x100, %eax\n"
    "    wrmsr\n"
    "    movl %cr0, %eax\n"
    "    orl $0x80000000, %eax\n" /* PG */
    "    movl %eax, %cr0\n"
    "    ljmpl $0x08, $(0x6000 + smp_long - smp_trampoline_start)\n"
    "    .code64\n"
    "smp_long:\n"
    "    movw $0x10, %ax\n"
    "    movw %ax, %ds\n"
    "    movw %ax, %es\n"
    "    movw %ax, %ss\n"
    "    movq (0x6000 + smp_trampoline_stack - smp_trampoline_start), %rsp\n"
    "    movq (0x6000 + smp_trampoline_entry - smp_trampoline_start), %rax\n"
    "    xorl %ebp, %ebp\n"
    "    jmp *%rax\n"
    "    .balign 8\n"
    "smp_gdt:\n"
    "    .quad 0\n"
    "    .quad 0x00af9b000000ffff\n"
    "    .quad 0x00cf93000000ffff\n"
    "    .quad 0x00cf9b000000ffff\n"
    "smp_gdt_pointer:\n"
    "    .word 31\n"
    "    .long 0x6000 + smp_gdt - smp_trampoline_start\n"
    "    .balign 8\n"
    "smp_trampoline_stack:\n"
    "    .quad 0\n"
    "smp_trampoline_entry:\n"
    "    .quad 0\n"
    "smp_trampoline_end:\n"
    "    .code64\n"
    "    .text\n");
