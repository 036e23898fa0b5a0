/* printf-like formatting: %[-0][width][.prec][l|ll|z|h|hh]{d,i,u,x,X,p,s,c,%}
 * and '*' for width/precision.  No floating point. */
#include <dksm/kit.h>

struct sink {
    char *buf;   /* NULL: console */
    size_t size; /* buffer size */
    size_t n;    /* characters produced so far */
};

static void emit(struct sink *k, char c)
{
    if (k->buf) {
        if (k->n + 1 < k->size)
            k->buf[k->n] = c;
    } else {
        con_putc(c);
    }
    k->n++;
}

static void emit_pad(struct sink *k, char c, int count)
{
    while (count-- > 0)
        emit(k, c);
}

static const char digits_lower[] = "0123456789abcdef";
static const char digits_upper[] = "0123456789ABCDEF";

static void emit_number(struct sink *k, u64 v, unsigned base, int upper, int neg,
                        int width, int zero, int left, int prec)
{
    char tmp[24];
    int len = 0;
    const char *dg = upper ? digits_upper : digits_lower;
    if (v == 0 && prec != 0)
        tmp[len++] = '0';
    while (v) {
        tmp[len++] = dg[v % base];
        v /= base;
    }
    int ndig = len < prec ? prec : len;
    int total = ndig + neg;
    if (!left && !(zero && prec < 0))
        emit_pad(k, ' ', width - total);
    if (neg)
        emit(k, '-');
    if (!left && zero && prec < 0)
        emit_pad(k, '0', width - total);
    emit_pad(k, '0', ndig - len);
    while (len)
        emit(k, tmp[--len]);
    if (left)
        emit_pad(k, ' ', width - total);
}

static int format(struct sink *k, const char *f, va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            emit(k, *f);
            continue;
        }
        f++;
        int left = 0, zero = 0, width = 0, prec = -1, lng = 0;
        for (;; f++) {
            if (*f == '-')
                left = 1;
            else if (*f == '0')
                zero = 1;
            else
                break;
        }
        if (*f == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = 1;
                width = -width;
            }
            f++;
        } else {
            while (*f >= '0' && *f <= '9')
                width = width * 10 + (*f++ - '0');
        }
        if (*f == '.') {
            f++;
            prec = 0;
            if (*f == '*') {
                prec = va_arg(ap, int);
                f++;
            } else {
                while (*f >= '0' && *f <= '9')
                    prec = prec * 10 + (*f++ - '0');
            }
        }
        while (*f == 'l' || *f == 'z' || *f == 'h') {
            if (*f != 'h')
                lng = 1;
            f++;
        }
        switch (*f) {
        case 'd':
        case 'i': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
            u64 u = v < 0 ? -(u64)v : (u64)v;
            emit_number(k, u, 10, 0, v < 0, width, zero, left, prec);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            emit_number(k, v, *f == 'u' ? 10 : 16, *f == 'X', 0, width, zero, left, prec);
            break;
        }
        case 'p':
            emit(k, '0');
            emit(k, 'x');
            emit_number(k, (u64)va_arg(ap, void *), 16, 0, 0, width, zero, left, prec);
            break;
        case 'c':
            if (!left)
                emit_pad(k, ' ', width - 1);
            emit(k, (char)va_arg(ap, int));
            if (left)
                emit_pad(k, ' ', width - 1);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = (int)(prec >= 0 ? strnlen(s, (size_t)prec) : strlen(s));
            if (!left)
                emit_pad(k, ' ', width - len);
            for (int i = 0; i < len; i++)
                emit(k, s[i]);
            if (left)
                emit_pad(k, ' ', width - len);
            break;
        }
        case '%':
            emit(k, '%');
            break;
        case '\0':
            return (int)k->n;
        default:
            emit(k, '%');
            emit(k, *f);
            break;
        }
    }
    return (int)k->n;
}

int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink k = {buf, size, 0};
    int n = format(&k, fmt, ap);
    if (size)
        buf[k.n < size ? k.n : size - 1] = '\0';
    return n;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int kvprintf(const char *fmt, va_list ap)
{
    struct sink k = {NULL, 0, 0};
    return format(&k, fmt, ap);
}

int kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvprintf(fmt, ap);
    va_end(ap);
    return n;
}
