/* Exception reporting and power off. */
#include <dksm/kit.h>

/* Layout pushed by dksm_exc_common in boot.S (lowest address first). */
struct kit_trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8;
    u64 rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

static const char *const exc_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
    "#BR bound range", "#UD invalid opcode", "#NM device not available",
    "#DF double fault", "coprocessor overrun", "#TS invalid TSS",
    "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
    "#MC machine check", "#XM SIMD error", "#VE virtualization", "#CP control protection",
    "reserved", "reserved", "reserved", "reserved", "reserved", "reserved",
    "#HV hypervisor injection", "#VC VMM communication", "#SX security", "reserved",
};

void kit_exception(struct kit_trap_frame *f) __noreturn;
void kit_exception(struct kit_trap_frame *f)
{
    u64 v = f->vector;
    kprintf("dksm: exception vector=%lu (%s) rip=0x%016lx err=0x%lx cr2=0x%lx rsp=0x%lx\n", v,
            v < 32 ? exc_names[v] : "irq", f->rip, f->error, read_cr2(), f->rsp);
    kit_shutdown();
}

void kit_shutdown(void)
{
    outb(0x64, 0xfe);   /* i8042 reset: Firecracker-style VMMs exit here */
    outw(0x604, 0x2000); /* ACPI S5 on QEMU-like machines */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void kit_panic(const char *fmt, ...)
{
    va_list ap;
    con_puts("dksm: panic: ");
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
    con_putc('\n');
    kit_shutdown();
}
