/* dksm guest kit: the runtime every guest app links against.
 *
 * Freestanding C (no libc).  All code is built with -mgeneral-regs-only, so
 * no SSE/x87 register is ever touched (see guests/README.md).
 */
#ifndef DKSM_KIT_H
#define DKSM_KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long s64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;

#define NULL ((void *)0)
#define DKSM_PAGE_SIZE 4096UL

#define __noreturn __attribute__((noreturn))
#define __aligned(n) __attribute__((aligned(n)))
#define __printf(a, b) __attribute__((format(printf, a, b)))

/* Every app defines its entry with DKSM_APP_MAIN.  The function is placed in
 * its own input section, which the linker script puts first in the app's
 * text, so the library reaches it at a fixed address (the first byte of the
 * app text region) whatever the app is. */
#define DKSM_APP_MAIN \
    __attribute__((section(".text.dksm.app_main"), used)) void app_main(void)
void app_main(void);

/* ---- port I/O --------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void cpu_halt_forever_irq(void) { for (;;) __asm__ volatile("sti; hlt" ::: "memory"); }

/* ---- console (16550 at 0x3f8, polled) ---------------------------------- */
void con_putc(char c);
void con_write(const char *s, size_t n);
void con_puts(const char *s); /* no newline added */
int kprintf(const char *fmt, ...) __printf(1, 2);
int ksnprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)
int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int kvprintf(const char *fmt, va_list ap);
void kit_banner(const char *app); /* prints "<app>: dksm guest kit" */

/* ---- strings ------------------------------------------------------------ */
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
u64 kstrtou64(const char *s, size_t n, int *ok);

/* ---- boot parameters (Linux zero page) --------------------------------- */
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define BP_E820_MAX 128

struct e820_entry {
    u64 addr;
    u64 size;
    u32 type;
} __attribute__((packed));

extern const u8 *kit_boot_params;
/* The command line: pointer and length (0 and "" if none). */
const char *kit_cmdline(size_t *len);
/* Value of "key=value" in the command line; returns 1 and sets *val and *vlen
 * when found (a bare "key" gives an empty value). */
int kit_cmdline_get(const char *key, const char **val, size_t *vlen);
u64 kit_cmdline_u64(const char *key, u64 dflt);
unsigned kit_e820_count(void);
int kit_e820_get(unsigned i, struct e820_entry *out);
u64 kit_e820_ram_total(void);

/* ---- power -------------------------------------------------------------- */
void kit_shutdown(void) __noreturn;
void kit_panic(const char *fmt, ...) __noreturn __printf(1, 2);

/* ---- hashes and pseudo-random numbers ------------------------------------ */
#define FNV64_OFFSET 0xcbf29ce484222325UL
#define FNV64_PRIME 0x00000100000001b3UL
u64 fnv1a64(u64 h, const void *p, size_t n);
static inline u64 xorshift64(u64 x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}
u32 crc32(u32 crc, const void *p, size_t n);
u64 splitmix64(u64 *state);

/* ---- library bank (generated code standing in for linked libraries) ----- */
typedef u64 (*bank_fn_t)(u64, u64);
unsigned bank_count(void);
u64 bank_call(unsigned idx, u64 a, u64 b);
u64 bank_selftest(unsigned first, unsigned n, u64 seed);
const char *bank_module_name(unsigned idx);

/* ---- misc --------------------------------------------------------------- */
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
static inline u64 read_cr4(void)
{
    u64 v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }
static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

/* Linker-script symbols describing the layout (addresses only).  Only apps
 * may use the app_* ones: library code must never depend on app addresses,
 * or its bytes would differ between apps. */
extern char __dksm_lib_text_start[], __dksm_lib_text_end[];
extern char __dksm_app_text_start[], __dksm_app_text_end[];
extern char __dksm_lib_rodata_start[], __dksm_lib_rodata_end[];
extern char __dksm_app_rodata_start[], __dksm_app_rodata_end[];

#endif
