/* platprobe: what the platform tells a guest besides RAM: the CMOS clock, the
 * hypervisor's CPUID leaves and the random-number instructions.
 *
 * The RTC is read in three formats (status register B): BCD 24-hour (0x02), binary
 * 24-hour (0x06) and BCD 12-hour (0x00), each after the update-in-progress bit of
 * status register A has cleared, and the raw bytes are printed for the host to
 * decode.  Then the guest sets the year to 99 (B's SET bit on, write, SET off) and
 * reads the clock again.
 *
 * Output (parsed by tests):
 *   platprobe: dksm guest kit
 *   platprobe: rtc b=<hex> sec=<hex> min=<hex> hour=<hex> wday=<hex> mday=<hex> mon=<hex> year=<hex> century=<hex>
 *      (three lines, B = 02, 06, 00; then one after setting the year, with B = 02)
 *   platprobe: hypervisor max=0x<hex> signature=<12 chars>
 *   platprobe: tsc_khz <n> lapic_khz <n>        or   platprobe: tsc leaf absent
 *   platprobe: rdrand cpuid=<0|1> <16 hex> <16 hex> cf=<n>     (values only if cpuid=1)
 *   platprobe: rdseed cpuid=<0|1> <16 hex> cf=<n>
 *   platprobe: bye
 */
#include <dksm/kit.h>

#define RTC_INDEX 0x70
#define RTC_DATA 0x71
#define RTC_A 0x0a
#define RTC_B 0x0b
#define RTC_A_UIP 0x80
#define RTC_B_SET 0x80

static const u8 rtc_fields[] = {0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32};

static u8 rtc_read(u8 reg)
{
    outb(RTC_INDEX, reg);
    return inb(RTC_DATA);
}

static void rtc_write(u8 reg, u8 value)
{
    outb(RTC_INDEX, reg);
    outb(RTC_DATA, value);
}

static void rtc_report(void)
{
    u8 v[sizeof(rtc_fields)];
    while (rtc_read(RTC_A) & RTC_A_UIP)
        ;
    for (unsigned i = 0; i < sizeof(rtc_fields); i++)
        v[i] = rtc_read(rtc_fields[i]);
    kprintf("platprobe: rtc b=%02x sec=%02x min=%02x hour=%02x wday=%02x mday=%02x mon=%02x"
            " year=%02x century=%02x\n",
            rtc_read(RTC_B), v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline u64 rdrand64(u8 *ok)
{
    u64 v;
    __asm__ volatile("rdrand %0; setc %1" : "=r"(v), "=qm"(*ok) : : "cc");
    return v;
}

static inline u64 rdseed64(u8 *ok)
{
    u64 v;
    __asm__ volatile("rdseed %0; setc %1" : "=r"(v), "=qm"(*ok) : : "cc");
    return v;
}

DKSM_APP_MAIN
{
    u32 r[4];
    u8 ok1 = 0, ok2 = 0;

    kit_banner("platprobe");
    const u8 modes[] = {0x02, 0x06, 0x00};
    for (unsigned i = 0; i < sizeof(modes); i++) {
        rtc_write(RTC_B, modes[i]);
        rtc_report();
    }
    rtc_write(RTC_B, 0x02 | RTC_B_SET);
    rtc_write(0x09, 0x99);
    rtc_write(RTC_B, 0x02);
    rtc_report();

    cpuid(0x40000000, 0, r);
    char signature[13];
    memcpy(signature, &r[1], 4);
    memcpy(signature + 4, &r[2], 4);
    memcpy(signature + 8, &r[3], 4);
    for (int i = 0; i < 12; i++)
        if (signature[i] < 0x20 || signature[i] > 0x7e)
            signature[i] = '.';
    signature[12] = 0;
    u32 max = r[0];
    kprintf("platprobe: hypervisor max=0x%x signature=%s\n", max, signature);
    if (max >= 0x40000010) {
        cpuid(0x40000010, 0, r);
        kprintf("platprobe: tsc_khz %u lapic_khz %u\n", r[0], r[1]);
    } else {
        kprintf("platprobe: tsc leaf absent\n");
    }

    cpuid(1, 0, r);
    if (r[2] & (1u << 30)) {
        u64 a = rdrand64(&ok1);
        u64 b = rdrand64(&ok2);
        kprintf("platprobe: rdrand cpuid=1 %016lx %016lx cf=%u\n", a, b, (unsigned)(ok1 & ok2));
    } else {
        kprintf("platprobe: rdrand cpuid=0\n");
    }
    cpuid(7, 0, r);
    if (r[1] & (1u << 18)) {
        u64 a = rdseed64(&ok1);
        kprintf("platprobe: rdseed cpuid=1 %016lx cf=%u\n", a, (unsigned)ok1);
    } else {
        kprintf("platprobe: rdseed cpuid=0\n");
    }
    kprintf("platprobe: bye\n");
}
