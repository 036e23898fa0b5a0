/* String and memory functions.  Byte loops kept simple on purpose: this code
 * runs emulated, and short inputs are the rule. */
#include <dksm/kit.h>

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if ((((uintptr_t)dp | (uintptr_t)sp | n) & 7) == 0) {
        u64 *dq = d;
        const u64 *sq = s;
        for (size_t i = 0; i < n / 8; i++)
            dq[i] = sq[i];
        return d;
    }
    for (size_t i = 0; i < n; i++)
        dp[i] = sp[i];
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp == sp || n == 0)
        return d;
    if (dp < sp) {
        for (size_t i = 0; i < n; i++)
            dp[i] = sp[i];
    } else {
        for (size_t i = n; i > 0; i--)
            dp[i - 1] = sp[i - 1];
    }
    return d;
}

void *memset(void *d, int c, size_t n)
{
    u8 *dp = d;
    if ((((uintptr_t)dp | n) & 7) == 0) {
        u64 v = (u8)c * 0x0101010101010101UL;
        u64 *dq = d;
        for (size_t i = 0; i < n / 8; i++)
            dq[i] = v;
        return d;
    }
    for (size_t i = 0; i < n; i++)
        dp[i] = (u8)c;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i])
            return (u8)a[i] - (u8)b[i];
        if (!a[i])
            return 0;
    }
    return 0;
}

char *strchr(const char *s, int c)
{
    for (;; s++) {
        if (*s == (char)c)
            return (char *)s;
        if (!*s)
            return NULL;
    }
}

/* Parse an unsigned number: decimal, or hex with a 0x prefix.  *ok is set to
 * 1 when all n characters were consumed and n > 0. */
u64 kstrtou64(const char *s, size_t n, int *ok)
{
    u64 v = 0;
    unsigned base = 10;
    size_t i = 0;
    *ok = 0;
    if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i >= n)
        return 0;
    for (; i < n; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return v;
        v = v * base + d;
    }
    *ok = 1;
    return v;
}
