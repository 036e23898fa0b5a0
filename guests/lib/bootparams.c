/* Reading the Linux zero page (struct boot_params) the VMM left for us. */
#include <dksm/kit.h>

const u8 *kit_boot_params;

static u32 rd32(unsigned off) { return *(const volatile u32 *)(kit_boot_params + off); }

const char *kit_cmdline(size_t *len)
{
    const char *p = (const char *)(uintptr_t)rd32(BP_CMD_LINE_PTR);
    if (!p) {
        *len = 0;
        return "";
    }
    /* cmdline_size bounds the string; 0 means "not given": cap at 4 KiB. */
    u32 max = rd32(BP_CMDLINE_SIZE);
    if (max == 0 || max > 4096)
        max = 4096;
    *len = strnlen(p, max);
    return p;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

int kit_cmdline_get(const char *key, const char **val, size_t *vlen)
{
    size_t n, klen = strlen(key);
    const char *s = kit_cmdline(&n);
    size_t i = 0;
    while (i < n) {
        while (i < n && is_space(s[i]))
            i++;
        size_t start = i;
        while (i < n && !is_space(s[i]))
            i++;
        size_t wlen = i - start;
        const char *w = s + start;
        if (wlen >= klen && strncmp(w, key, klen) == 0) {
            if (wlen == klen) {
                *val = w + wlen;
                *vlen = 0;
                return 1;
            }
            if (w[klen] == '=') {
                *val = w + klen + 1;
                *vlen = wlen - klen - 1;
                return 1;
            }
        }
    }
    return 0;
}

u64 kit_cmdline_u64(const char *key, u64 dflt)
{
    const char *v;
    size_t n;
    int ok;
    if (!kit_cmdline_get(key, &v, &n))
        return dflt;
    u64 x = kstrtou64(v, n, &ok);
    return ok ? x : dflt;
}

unsigned kit_e820_count(void)
{
    unsigned n = kit_boot_params[BP_E820_ENTRIES];
    return n > BP_E820_MAX ? BP_E820_MAX : n;
}

int kit_e820_get(unsigned i, struct e820_entry *out)
{
    if (i >= kit_e820_count())
        return 0;
    const volatile u8 *e = kit_boot_params + BP_E820_TABLE + 20 * i;
    out->addr = *(const volatile u64 *)e;
    out->size = *(const volatile u64 *)(e + 8);
    out->type = *(const volatile u32 *)(e + 16);
    return 1;
}

u64 kit_e820_ram_total(void)
{
    struct e820_entry e;
    u64 total = 0;
    for (unsigned i = 0; kit_e820_get(i, &e); i++)
        if (e.type == 1)
            total += e.size;
    return total;
}
