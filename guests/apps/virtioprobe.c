/* virtioprobe: a driver for the VMM's virtio-mmio devices, and tests of them.
 *
 * The devices are found the way a Linux guest finds them on Firecracker: from
 * "virtio_mmio.device=<size>K@0x<address>:<irq>" words on the command line.  The
 * probe maps the MMIO gap (its 2 MiB pages from 3 GiB up, uncached), brings each
 * device up with the virtio 1.x sequence (reset, ACKNOWLEDGE, DRIVER, features,
 * FEATURES_OK, queues, DRIVER_OK), sleeps with "sti; hlt" until the device's
 * interrupt arrives through the 8259 PIC, and acknowledges it.  Queues are split
 * rings of 16 entries.  Everything is built with -mgeneral-regs-only, like the kit.
 *
 * What it does, per device type (in this order; all lines start "virtioprobe: "):
 *   first:         "cmdline \"<the command line>\""
 *   every device:  "device <i> at 0x<addr> irq <n> type <t>"
 *   block (2):     "blk <id> capacity <sectors> ro <0|1>" (id from GET_ID)
 *                  "blk <id> sector <s> fnv 0x<16 hex>"  for sectors 0 and capacity-1
 *                  "blk <id> read past end status <s>"  (1: the device refused it)
 *                  read-write: writes 8 sectors from "blkwrite=<sector>" (default 1)
 *                  with pattern(o) = (o * 7) ^ (o >> 9) ^ 0x5a of each absolute byte
 *                  offset o, flushes and reads back:
 *                  "blk <id> wrote 8 sectors at <s> status <s> flush <s> readback ok|BAD"
 *                  read-only: "blk <id> write refused status <s>" and the sector 0
 *                  line again.  "blkbench=read:<MiB>" / "blkbench=write:<MiB>" moves
 *                  that much from sector 0 in 1 MiB requests between
 *                  "blkbench start" and "blkbench done <bytes> status <s>".
 *   entropy (4):   "rng <64 hex>" twice (two 32-byte requests)
 *                  "bad=<kind>|all": breaks the entropy queue on purpose, each kind
 *                  in turn (outside, loop, direction, index, jump, notready):
 *                  "bad <kind> status 0x<s> (needs reset)" then, after a reset and
 *                  a fresh start, "bad <kind> after reset rng ok|BAD"
 *   vsock (19):    "vsock cid <cid>"; "vsockconnect=<port>" connects to the host
 *                  port, sends "hello from the guest\n", prints
 *                  "vsock host said \"<line>\"" and shuts the connection down;
 *                  then serves "vsockport=<port>" (default 52) until "quit".
 *   net (1):       "net mac <mac> ip <a.b.c.d>" (ip= from the command line), then
 *                  answers ARP requests for its address, ICMP echo requests and
 *                  UDP datagrams (echoed back to the sender) until a UDP or vsock
 *                  payload starting "quit"; "netquiet" leaves out the per-packet
 *                  lines ("net arp", "net icmp seq <n>", "net udp <n> bytes").
 *   initrd:        if the VMM loaded one, one word from each of its pages is read:
 *                  "initrd at 0x<addr> size <bytes> pages <n> sum 0x<16 hex>" (the
 *                  sum of the first little-endian u64 of every page); with
 *                  "initrdwrite" each page's first word is then overwritten with
 *                  0x544952574d534b44 ("DKSMWRIT") and read back:
 *                  "initrd written sum 0x<16 hex>".  (First, after the devices list.)
 *   last:          "served <n> packets" (if it served) and "done".
 */
#include <dksm/kit.h>

/* ---- virtio-mmio registers and constants -------------------------------- */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_DRIVER_LO 0x090
#define R_DRIVER_HI 0x094
#define R_DEVICE_LO 0x0a0
#define R_DEVICE_HI 0x0a4
#define R_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 64

#define F_VERSION_1 (1UL << 32)
#define D_NEXT 1
#define D_WRITE 2

#define T_NET 1
#define T_BLOCK 2
#define T_ENTROPY 4
#define T_VSOCK 19

#define QSIZE 16
#define MAX_DEVS 8

struct vdesc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vavail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
};
struct vused_elem {
    u32 id;
    u32 len;
};
struct vused {
    u16 flags;
    u16 idx;
    struct vused_elem ring[QSIZE];
    u16 avail_event;
};

struct vq {
    volatile struct vdesc *desc;
    volatile struct vavail *avail;
    volatile struct vused *used;
    u16 next_avail;
    u16 last_used;
};

struct vdev {
    u64 base;
    u32 irq;
    u32 type;
    u64 features;
    struct vq q[3];
};

static struct vdev devs[MAX_DEVS];
static unsigned ndevs;
static u8 qpages[MAX_DEVS][3][4096] __aligned(4096);
static u64 mmio_pd[512] __aligned(4096);

#define barrier() __asm__ volatile("" ::: "memory")

static inline u32 rd(struct vdev *d, u32 off) { return *(volatile u32 *)(d->base + off); }
static inline void wr(struct vdev *d, u32 off, u32 v) { *(volatile u32 *)(d->base + off) = v; }

/* The VMM's identity map covers the first GiB; add the 4th (3-4 GiB), uncached. */
static void map_mmio(void)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL);
    u64 *pdpt = (u64 *)(pml4[0] & 0x000ffffffffff000UL);
    for (u64 i = 0; i < 512; i++)
        mmio_pd[i] = (0xc0000000UL + (i << 21)) | 0x9b; /* P RW PWT PCD PS */
    pdpt[3] = (u64)mmio_pd | 3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* "virtio_mmio.device=4K@0xd0000000:5" words. */
static void find_devices(void)
{
    static const char key[] = "virtio_mmio.device=";
    size_t n, klen = sizeof(key) - 1;
    const char *s = kit_cmdline(&n);
    size_t i = 0;
    while (i < n && ndevs < MAX_DEVS) {
        while (i < n && is_space(s[i]))
            i++;
        size_t start = i;
        while (i < n && !is_space(s[i]))
            i++;
        if (i - start <= klen || strncmp(s + start, key, klen) != 0)
            continue;
        const char *w = s + start + klen, *end = s + i;
        const char *at = w, *colon;
        while (at < end && *at != '@')
            at++;
        colon = at;
        while (colon < end && *colon != ':')
            colon++;
        int ok1, ok2;
        u64 addr = kstrtou64(at + 1, (size_t)(colon - at - 1), &ok1);
        u64 irq = kstrtou64(colon + 1, (size_t)(end - colon - 1), &ok2);
        if (at == end || colon == end || !ok1 || !ok2) {
            kprintf("virtioprobe: cannot parse %.*s\n", (int)(end - s - start), s + start);
            continue;
        }
        devs[ndevs].base = addr;
        devs[ndevs].irq = (u32)irq;
        ndevs++;
    }
}

/* ---- interrupts: the 8259 PIC, vectors 32-47 ------------------------------ */
static void pic_unmask(u32 irqs)
{
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    if (irqs & 0xff00)
        irqs |= 1u << 2; /* the cascade */
    outb(0x21, (u8)~irqs);
    outb(0xa1, (u8)~(irqs >> 8));
}

/* Sleep until an interrupt, then acknowledge whatever the device reports. */
static u32 wait_irq(struct vdev *d)
{
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    u32 is = rd(d, R_INT_STATUS);
    if (is)
        wr(d, R_INT_ACK, is);
    return is;
}

/* ---- device and queue set-up -------------------------------------------- */
static int dev_begin(struct vdev *d, u64 accept)
{
    if (rd(d, R_MAGIC) != 0x74726976 || rd(d, R_VERSION) != 2)
        return -1;
    d->type = rd(d, R_DEVICE_ID);
    wr(d, R_STATUS, 0);
    wr(d, R_STATUS, ST_ACK);
    wr(d, R_STATUS, ST_ACK | ST_DRIVER);
    wr(d, R_DEV_FEATURES_SEL, 0);
    u64 f = rd(d, R_DEV_FEATURES);
    wr(d, R_DEV_FEATURES_SEL, 1);
    f |= (u64)rd(d, R_DEV_FEATURES) << 32;
    d->features = f & (accept | F_VERSION_1);
    wr(d, R_DRV_FEATURES_SEL, 0);
    wr(d, R_DRV_FEATURES, (u32)d->features);
    wr(d, R_DRV_FEATURES_SEL, 1);
    wr(d, R_DRV_FEATURES, (u32)(d->features >> 32));
    wr(d, R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd(d, R_STATUS) & ST_FEATURES_OK))
        return -2;
    return 0;
}

static int vq_setup(struct vdev *d, unsigned qi)
{
    struct vq *q = &d->q[qi];
    u8 *page = qpages[d - devs][qi];
    wr(d, R_QUEUE_SEL, qi);
    if (rd(d, R_QUEUE_NUM_MAX) < QSIZE)
        return -1;
    memset(page, 0, 1024);
    q->desc = (volatile struct vdesc *)page;
    q->avail = (volatile struct vavail *)(page + 256);
    q->used = (volatile struct vused *)(page + 512);
    q->next_avail = 0;
    q->last_used = 0;
    wr(d, R_QUEUE_NUM, QSIZE);
    wr(d, R_DESC_LO, (u32)(u64)q->desc);
    wr(d, R_DESC_HI, 0);
    wr(d, R_DRIVER_LO, (u32)(u64)q->avail);
    wr(d, R_DRIVER_HI, 0);
    wr(d, R_DEVICE_LO, (u32)(u64)q->used);
    wr(d, R_DEVICE_HI, 0);
    wr(d, R_QUEUE_READY, 1);
    return 0;
}

static int dev_start(struct vdev *d, u64 accept, unsigned nqueues)
{
    int r = dev_begin(d, accept);
    if (r)
        return r;
    for (unsigned i = 0; i < nqueues; i++)
        if (vq_setup(d, i))
            return -3;
    wr(d, R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    return 0;
}

static void set_desc(struct vq *q, u16 i, const void *addr, u32 len, u16 flags, u16 next)
{
    q->desc[i].addr = (u64)addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

static void vq_push(struct vq *q, u16 head)
{
    q->avail->ring[q->next_avail % QSIZE] = head;
    barrier();
    q->next_avail++;
    q->avail->idx = q->next_avail;
    barrier();
}

static void notify(struct vdev *d, u32 qi) { wr(d, R_QUEUE_NOTIFY, qi); }

static int vq_used(struct vq *q, u32 *id, u32 *len)
{
    if (q->used->idx == q->last_used)
        return 0;
    barrier();
    volatile struct vused_elem *e = &q->used->ring[q->last_used % QSIZE];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

static void wait_used(struct vdev *d, unsigned qi, u32 *id, u32 *len)
{
    while (!vq_used(&d->q[qi], id, len))
        wait_irq(d);
}

static u32 cfg32(struct vdev *d, u32 off) { return rd(d, R_CONFIG + off); }

static void print_hex(const u8 *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kprintf("%02x", p[i]);
}

/* ---- block ---------------------------------------------------------------- */
#define BLK_F_RO (1UL << 5)
#define BLK_F_FLUSH (1UL << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_BUF (1UL << 20)        /* one benchmark request */
#define BLK_BENCH_BUF 0x800000UL    /* where its buffer lives: RAM above the image */

static struct {
    u32 type;
    u32 reserved;
    u64 sector;
} blk_hdr __aligned(16);
static volatile u8 blk_status;
static u8 blk_buf[4096] __aligned(4096);

static int blk_request(struct vdev *d, u32 type, u64 sector, void *buf, u32 len)
{
    struct vq *q = &d->q[0];
    u32 id, ulen;
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    u16 data_flags = (type == BLK_T_OUT) ? 0 : D_WRITE;
    if (len) {
        set_desc(q, 0, &blk_hdr, 16, D_NEXT, 1);
        set_desc(q, 1, buf, len, D_NEXT | data_flags, 2);
        set_desc(q, 2, (const void *)&blk_status, 1, D_WRITE, 0);
    } else {
        set_desc(q, 0, &blk_hdr, 16, D_NEXT, 1);
        set_desc(q, 1, (const void *)&blk_status, 1, D_WRITE, 0);
    }
    vq_push(q, 0);
    notify(d, 0);
    wait_used(d, 0, &id, &ulen);
    return blk_status;
}

static u8 pattern(u64 off) { return (u8)((off * 7) ^ (off >> 9) ^ 0x5a); }

static void blk_probe(struct vdev *d)
{
    char id[21];
    if (dev_start(d, BLK_F_RO | BLK_F_FLUSH, 1)) {
        kprintf("virtioprobe: blk start failed\n");
        return;
    }
    u64 cap = cfg32(d, 0) | ((u64)cfg32(d, 4) << 32);
    int ro = (d->features & BLK_F_RO) != 0;
    memset(id, 0, sizeof(id));
    blk_request(d, BLK_T_GET_ID, 0, id, 20);
    kprintf("virtioprobe: blk %s capacity %lu ro %d\n", id, cap, ro);

    const char *mode;
    size_t mlen;
    if (kit_cmdline_get("blkbench", &mode, &mlen) && mlen > 5) {
        int write = strncmp(mode, "write:", 6) == 0;
        int ok;
        u64 mib = kstrtou64(mode + (write ? 6 : 5), mlen - (write ? 6 : 5), &ok);
        u64 sectors = BLK_BUF / 512, moved = 0;
        int st = 0;
        if (kit_e820_ram_total() < BLK_BENCH_BUF + BLK_BUF + 0x100000) {
            kprintf("virtioprobe: blkbench needs at least 10 MiB of RAM\n");
            return;
        }
        kprintf("virtioprobe: blkbench start\n");
        for (u64 i = 0; i < mib && st == 0; i++) {
            st = blk_request(d, write ? BLK_T_OUT : BLK_T_IN, i * sectors, (void *)BLK_BENCH_BUF,
                             BLK_BUF);
            moved += BLK_BUF;
        }
        if (write && st == 0)
            st = blk_request(d, BLK_T_FLUSH, 0, NULL, 0);
        kprintf("virtioprobe: blkbench done %lu status %d\n", moved, st);
        return;
    }

    u64 sectors[2] = {0, cap ? cap - 1 : 0};
    for (int i = 0; i < 2 && cap; i++) {
        int st = blk_request(d, BLK_T_IN, sectors[i], blk_buf, 512);
        kprintf("virtioprobe: blk %s sector %lu fnv 0x%016lx status %d\n", id, sectors[i],
                fnv1a64(FNV64_OFFSET, blk_buf, 512), st);
    }
    kprintf("virtioprobe: blk %s read past end status %d\n", id,
            blk_request(d, BLK_T_IN, cap, blk_buf, 512));
    if (ro) {
        memset(blk_buf, 0xee, 512);
        kprintf("virtioprobe: blk %s write refused status %d\n", id,
                blk_request(d, BLK_T_OUT, 0, blk_buf, 512));
        int st = blk_request(d, BLK_T_IN, 0, blk_buf, 512);
        kprintf("virtioprobe: blk %s sector 0 fnv 0x%016lx status %d\n", id,
                fnv1a64(FNV64_OFFSET, blk_buf, 512), st);
        return;
    }
    u64 s = kit_cmdline_u64("blkwrite", 1);
    u64 base = s * 512;
    for (u64 j = 0; j < 4096; j++)
        blk_buf[j] = pattern(base + j);
    int wst = blk_request(d, BLK_T_OUT, s, blk_buf, 4096);
    int fst = blk_request(d, BLK_T_FLUSH, 0, NULL, 0);
    memset(blk_buf, 0, 4096);
    int rst = blk_request(d, BLK_T_IN, s, blk_buf, 4096);
    int good = rst == 0;
    for (u64 j = 0; j < 4096 && good; j++)
        good = blk_buf[j] == pattern(base + j);
    kprintf("virtioprobe: blk %s wrote 8 sectors at %lu status %d flush %d readback %s\n", id, s,
            wst, fst, good ? "ok" : "BAD");
}

/* ---- entropy and the broken-queue tests ------------------------------------ */
static u8 rng_buf[64] __aligned(64);

static int rng_read(struct vdev *d, u32 n)
{
    u32 id, len;
    memset(rng_buf, 0, sizeof(rng_buf));
    set_desc(&d->q[0], 0, rng_buf, n, D_WRITE, 0);
    vq_push(&d->q[0], 0);
    notify(d, 0);
    wait_used(d, 0, &id, &len);
    return (int)len;
}

static int rng_nonzero(void)
{
    for (unsigned i = 0; i < 32; i++)
        if (rng_buf[i])
            return 1;
    return 0;
}

static void wait_needs_reset(struct vdev *d)
{
    for (int i = 0; i < 1000 && !(rd(d, R_STATUS) & ST_NEEDS_RESET); i++)
        wait_irq(d);
}

static void bad_one(struct vdev *d, const char *kind)
{
    struct vq *q = &d->q[0];
    if (strcmp(kind, "notready") == 0) {
        if (dev_begin(d, 0) == 0)
            notify(d, 0); /* FEATURES_OK, no queue ready, no DRIVER_OK */
    } else {
        dev_start(d, 0, 1);
        if (strcmp(kind, "outside") == 0) {
            set_desc(q, 0, (const void *)0x7ff000000000UL, 32, D_WRITE, 0);
            vq_push(q, 0);
        } else if (strcmp(kind, "loop") == 0) {
            set_desc(q, 0, rng_buf, 8, D_WRITE | D_NEXT, 1);
            set_desc(q, 1, rng_buf + 8, 8, D_WRITE | D_NEXT, 0);
            vq_push(q, 0);
        } else if (strcmp(kind, "direction") == 0) {
            set_desc(q, 0, rng_buf, 32, 0, 0); /* device-readable: wrong for entropy */
            vq_push(q, 0);
        } else if (strcmp(kind, "index") == 0) {
            set_desc(q, 0, rng_buf, 32, D_WRITE, 0);
            vq_push(q, 200); /* head beyond the queue */
        } else { /* jump: the available index runs far ahead */
            set_desc(q, 0, rng_buf, 32, D_WRITE, 0);
            q->avail->ring[0] = 0;
            q->avail->idx = 100;
        }
        notify(d, 0);
    }
    wait_needs_reset(d);
    kprintf("virtioprobe: bad %s status 0x%x (%s)\n", kind, rd(d, R_STATUS),
            rd(d, R_STATUS) & ST_NEEDS_RESET ? "needs reset" : "NOT FLAGGED");
    int ok = dev_start(d, 0, 1) == 0 && rng_read(d, 32) == 32 && rng_nonzero();
    kprintf("virtioprobe: bad %s after reset rng %s\n", kind, ok ? "ok" : "BAD");
}

static void rng_probe(struct vdev *d)
{
    if (dev_start(d, 0, 1)) {
        kprintf("virtioprobe: rng start failed\n");
        return;
    }
    for (int i = 0; i < 2; i++) {
        int n = rng_read(d, 32);
        kprintf("virtioprobe: rng ");
        print_hex(rng_buf, (size_t)n);
        kprintf("\n");
    }
    const char *bad;
    size_t blen;
    if (!kit_cmdline_get("bad", &bad, &blen))
        return;
    static const char *const kinds[] = {"outside", "loop", "direction", "index", "jump",
                                        "notready"};
    for (unsigned i = 0; i < ARRAY_SIZE(kinds); i++) {
        size_t klen = strlen(kinds[i]);
        if ((blen == 3 && strncmp(bad, "all", 3) == 0) ||
            (blen == klen && strncmp(bad, kinds[i], klen) == 0))
            bad_one(d, kinds[i]);
    }
}

/* ---- shared by net and vsock: receive buffers, transmit slots ---------------- */
#define PKT_BUF 2048
static u8 rxbufs[2][QSIZE][PKT_BUF] __aligned(4096);
static u8 txbufs[2][QSIZE][PKT_BUF] __aligned(4096);
static u16 tx_next[2];
static u16 tx_inflight[2];
static int quit;
static u64 served;

static void post_rx(struct vdev *d, int which, u16 i)
{
    set_desc(&d->q[0], i, rxbufs[which][i], PKT_BUF, D_WRITE, 0);
    vq_push(&d->q[0], i);
}

static void reclaim_tx(struct vdev *d, int which)
{
    u32 id, len;
    while (vq_used(&d->q[1], &id, &len))
        tx_inflight[which]--;
}

/* A free transmit buffer (waiting for one if all are in flight). */
static u8 *tx_slot(struct vdev *d, int which, u16 *slot)
{
    reclaim_tx(d, which);
    while (tx_inflight[which] == QSIZE) {
        wait_irq(d);
        reclaim_tx(d, which);
    }
    *slot = tx_next[which]++ % QSIZE;
    return txbufs[which][*slot];
}

static void tx_send(struct vdev *d, int which, u16 slot, u32 len)
{
    set_desc(&d->q[1], slot, txbufs[which][slot], len, 0, 0);
    tx_inflight[which]++;
    vq_push(&d->q[1], slot);
    notify(d, 1);
}

/* ---- net: ARP, ICMP echo and UDP echo --------------------------------------- */
#define NET_F_MAC (1UL << 5)
#define NET_HDR 12
static u8 my_mac[6];
static u8 my_ip[4];
static int net_quiet;

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static u16 checksum(const u8 *p, size_t n)
{
    u32 sum = 0;
    for (; n > 1; p += 2, n -= 2)
        sum += get16(p);
    if (n)
        sum += (u32)p[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void parse_ip(void)
{
    const char *v;
    size_t n;
    my_ip[0] = 192, my_ip[1] = 0, my_ip[2] = 2, my_ip[3] = 2;
    if (!kit_cmdline_get("ip", &v, &n))
        return;
    unsigned part = 0;
    u32 acc = 0;
    for (size_t i = 0; i <= n && part < 4; i++) {
        if (i == n || v[i] == '.') {
            my_ip[part++] = (u8)acc;
            acc = 0;
        } else {
            acc = acc * 10 + (u32)(v[i] - '0');
        }
    }
}

static void net_reply(struct vdev *d, const u8 *in, u32 len)
{
    u16 slot;
    if (len < 14)
        return;
    u16 type = get16(in + 12);
    u8 *buf = tx_slot(d, 0, &slot);
    u8 *out = buf + NET_HDR;
    memset(buf, 0, NET_HDR);
    memcpy(out, in + 6, 6); /* to the sender */
    memcpy(out + 6, my_mac, 6);
    memcpy(out + 12, in + 12, 2);
    if (type == 0x0806 && len >= 42 && get16(in + 20) == 1 && memcmp(in + 38, my_ip, 4) == 0) {
        memcpy(out + 14, in + 14, 6); /* htype, ptype, hlen, plen */
        put16(out + 20, 2);           /* reply */
        memcpy(out + 22, my_mac, 6);
        memcpy(out + 28, my_ip, 4);
        memcpy(out + 32, in + 22, 10); /* the asker's MAC and IP */
        tx_send(d, 0, slot, NET_HDR + 42);
        served++;
        if (!net_quiet)
            kprintf("virtioprobe: net arp\n");
        return;
    }
    if (type != 0x0800 || len < 34 || memcmp(in + 30, my_ip, 4) != 0)
        return;
    const u8 *ip = in + 14;
    u32 ihl = (u32)(ip[0] & 15) * 4, total = get16(ip + 2);
    if (ihl < 20 || total < ihl || 14 + total > len || total > PKT_BUF - NET_HDR - 14)
        return;
    u8 *oip = out + 14;
    memcpy(oip, ip, total);
    memcpy(oip + 12, ip + 16, 4); /* swap addresses */
    memcpy(oip + 16, ip + 12, 4);
    oip[8] = 64; /* TTL */
    u8 *l4 = oip + ihl;
    u32 l4len = total - ihl;
    if (ip[9] == 1 && l4len >= 8 && l4[0] == 8) { /* ICMP echo request */
        l4[0] = 0;
        put16(l4 + 2, 0);
        put16(l4 + 2, checksum(l4, l4len));
        if (!net_quiet)
            kprintf("virtioprobe: net icmp seq %u\n", get16(l4 + 6));
    } else if (ip[9] == 17 && l4len >= 8) { /* UDP: echo to the sender's port */
        memcpy(l4, ip + ihl + 2, 2);
        memcpy(l4 + 2, ip + ihl, 2);
        put16(l4 + 6, 0); /* no checksum (allowed over IPv4) */
        if (!net_quiet)
            kprintf("virtioprobe: net udp %u bytes\n", l4len - 8);
        if (l4len >= 12 && memcmp(l4 + 8, "quit", 4) == 0)
            quit = 1;
    } else {
        return;
    }
    put16(oip + 10, 0);
    put16(oip + 10, checksum(oip, ihl));
    tx_send(d, 0, slot, NET_HDR + 14 + total);
    served++;
}

static int net_start(struct vdev *d)
{
    if (dev_start(d, NET_F_MAC, 2))
        return -1;
    for (int i = 0; i < 6; i++)
        my_mac[i] = (d->features & NET_F_MAC) ? (u8)(rd(d, R_CONFIG + (u32)(i & ~3)) >> (8 * (i & 3)))
                                              : (u8)(i == 0 ? 0x06 : i);
    parse_ip();
    net_quiet = kit_cmdline_get("netquiet", &(const char *){0}, &(size_t){0});
    for (u16 i = 0; i < QSIZE; i++)
        post_rx(d, 0, i);
    notify(d, 0);
    kprintf("virtioprobe: net mac %02x:%02x:%02x:%02x:%02x:%02x ip %u.%u.%u.%u\n", my_mac[0],
            my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], my_ip[0], my_ip[1], my_ip[2],
            my_ip[3]);
    return 0;
}

static void net_poll(struct vdev *d)
{
    u32 id, len;
    int reposted = 0;
    while (vq_used(&d->q[0], &id, &len)) {
        if (id < QSIZE && len > NET_HDR)
            net_reply(d, rxbufs[0][id] + NET_HDR, len - NET_HDR);
        post_rx(d, 0, (u16)(id % QSIZE));
        reposted = 1;
    }
    if (reposted)
        notify(d, 0);
    reclaim_tx(d, 0);
}

/* ---- vsock --------------------------------------------------------------- */
#define VS_HDR 44
#define VS_REQUEST 1
#define VS_RESPONSE 2
#define VS_RST 3
#define VS_SHUTDOWN 4
#define VS_RW 5
#define VS_CREDIT_UPDATE 6
#define VS_CREDIT_REQUEST 7
#define VS_BUF_ALLOC 65536
#define VS_MY_PORT_OUT 0x4000

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u64 my_cid;
static u32 listen_port;
static u32 vs_fwd_in, vs_fwd_out; /* bytes consumed, per connection */
static int vs_out_state; /* 0 idle, 1 connecting, 2 connected, 3 refused, 4 closed */
static char vs_said[128];
static int vs_said_len = -1;

static void vs_send(struct vdev *d, u32 src_port, u32 dst_port, u16 op, u32 flags, const void *data,
                    u32 len)
{
    u16 slot;
    u8 *buf = tx_slot(d, 1, &slot);
    struct vsock_hdr *h = (struct vsock_hdr *)buf;
    h->src_cid = my_cid;
    h->dst_cid = 2;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = 1; /* stream */
    h->op = op;
    h->flags = flags;
    h->buf_alloc = VS_BUF_ALLOC;
    h->fwd_cnt = src_port == VS_MY_PORT_OUT ? vs_fwd_out : vs_fwd_in;
    if (len)
        memcpy(buf + VS_HDR, data, len);
    tx_send(d, 1, slot, VS_HDR + len);
}

static void vs_packet(struct vdev *d, const u8 *pkt, u32 len)
{
    if (len < VS_HDR)
        return;
    const struct vsock_hdr *h = (const struct vsock_hdr *)pkt;
    u32 plen = h->len <= len - VS_HDR ? h->len : len - VS_HDR;
    const u8 *payload = pkt + VS_HDR;
    if (h->op == VS_RW && h->dst_port == VS_MY_PORT_OUT)
        vs_fwd_out += plen;
    else if (h->op == VS_RW)
        vs_fwd_in += plen;
    if (h->dst_port == VS_MY_PORT_OUT) { /* our own connection to the host */
        if (h->op == VS_RESPONSE)
            vs_out_state = 2;
        else if (h->op == VS_RST)
            vs_out_state = vs_out_state == 1 ? 3 : 4;
        else if (h->op == VS_RW && vs_said_len < 0) {
            vs_said_len = (int)(plen < sizeof(vs_said) - 1 ? plen : sizeof(vs_said) - 1);
            memcpy(vs_said, payload, (size_t)vs_said_len);
            while (vs_said_len > 0 && (vs_said[vs_said_len - 1] == '\n'))
                vs_said_len--;
        } else if (h->op == VS_SHUTDOWN)
            vs_send(d, VS_MY_PORT_OUT, h->src_port, VS_RST, 0, NULL, 0);
        return;
    }
    if (h->dst_port != listen_port) {
        if (h->op != VS_RST)
            vs_send(d, h->dst_port, h->src_port, VS_RST, 0, NULL, 0);
        return;
    }
    switch (h->op) {
    case VS_REQUEST:
        vs_fwd_in = 0; /* a new connection: nothing consumed yet */
        vs_send(d, listen_port, h->src_port, VS_RESPONSE, 0, NULL, 0);
        kprintf("virtioprobe: vsock accepted port %u from host port %u\n", listen_port,
                h->src_port);
        break;
    case VS_RW:
        vs_send(d, listen_port, h->src_port, VS_RW, 0, payload, plen);
        served++;
        if (!net_quiet)
            kprintf("virtioprobe: vsock echoed %u bytes\n", plen);
        if (plen >= 4 && memcmp(payload, "quit", 4) == 0)
            quit = 1;
        break;
    case VS_SHUTDOWN:
        vs_send(d, listen_port, h->src_port, VS_RST, 0, NULL, 0);
        break;
    case VS_CREDIT_REQUEST:
        vs_send(d, listen_port, h->src_port, VS_CREDIT_UPDATE, 0, NULL, 0);
        break;
    default:
        break;
    }
}

static void vsock_poll(struct vdev *d)
{
    u32 id, len;
    int reposted = 0;
    while (vq_used(&d->q[0], &id, &len)) {
        if (id < QSIZE)
            vs_packet(d, rxbufs[1][id], len);
        post_rx(d, 1, (u16)(id % QSIZE));
        reposted = 1;
    }
    if (reposted)
        notify(d, 0);
    reclaim_tx(d, 1);
}

static int vsock_start(struct vdev *d)
{
    if (dev_start(d, 0, 3))
        return -1;
    my_cid = cfg32(d, 0) | ((u64)cfg32(d, 4) << 32);
    listen_port = (u32)kit_cmdline_u64("vsockport", 52);
    for (u16 i = 0; i < QSIZE; i++)
        post_rx(d, 1, i);
    notify(d, 0);
    kprintf("virtioprobe: vsock cid %lu\n", my_cid);
    u64 port = kit_cmdline_u64("vsockconnect", 0);
    if (!port)
        return 0;
    static const char hello[] = "hello from the guest\n";
    vs_out_state = 1;
    vs_send(d, VS_MY_PORT_OUT, (u32)port, VS_REQUEST, 0, NULL, 0);
    while (vs_out_state == 1) {
        wait_irq(d);
        vsock_poll(d);
    }
    if (vs_out_state != 2) {
        kprintf("virtioprobe: vsock connect to host port %lu refused\n", port);
        return 0;
    }
    vs_send(d, VS_MY_PORT_OUT, (u32)port, VS_RW, 0, hello, sizeof(hello) - 1);
    while (vs_said_len < 0 && vs_out_state == 2) {
        wait_irq(d);
        vsock_poll(d);
    }
    kprintf("virtioprobe: vsock host said \"%.*s\"\n", vs_said_len < 0 ? 0 : vs_said_len, vs_said);
    vs_send(d, VS_MY_PORT_OUT, (u32)port, VS_SHUTDOWN, 3, NULL, 0);
    while (vs_out_state == 2) {
        wait_irq(d);
        vsock_poll(d);
    }
    return 0;
}

/* ---- the initrd: read (and maybe overwrite) one word per page ---------------- */
#define INITRD_MARK 0x544952574d534b44UL

static u64 initrd_sum(u64 addr, u64 pages)
{
    u64 sum = 0;
    for (u64 p = 0; p < pages; p++)
        sum += *(volatile u64 *)(addr + p * DKSM_PAGE_SIZE);
    return sum;
}

static void initrd_probe(void)
{
    u64 addr = *(const volatile u32 *)(kit_boot_params + 0x218);
    u64 size = *(const volatile u32 *)(kit_boot_params + 0x21c);
    const char *v;
    size_t n;
    if (!size)
        return;
    u64 pages = (size + DKSM_PAGE_SIZE - 1) / DKSM_PAGE_SIZE;
    kprintf("virtioprobe: initrd at 0x%lx size %lu pages %lu sum 0x%016lx\n", addr, size, pages,
            initrd_sum(addr, pages));
    if (!kit_cmdline_get("initrdwrite", &v, &n))
        return;
    for (u64 p = 0; p < pages; p++)
        *(volatile u64 *)(addr + p * DKSM_PAGE_SIZE) = INITRD_MARK;
    kprintf("virtioprobe: initrd written sum 0x%016lx\n", initrd_sum(addr, pages));
}

/* ---- the probe ------------------------------------------------------------ */
DKSM_APP_MAIN
{
    struct vdev *net = NULL, *vsock = NULL;
    u32 irqs = 0;

    kit_banner("virtioprobe");
    size_t clen;
    const char *cl = kit_cmdline(&clen);
    kprintf("virtioprobe: cmdline \"%.*s\"\n", (int)clen, cl);
    find_devices();
    map_mmio();
    for (unsigned i = 0; i < ndevs; i++)
        if (devs[i].irq < 16)
            irqs |= 1u << devs[i].irq;
    pic_unmask(irqs);
    for (unsigned i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        d->type = rd(d, R_MAGIC) == 0x74726976 ? rd(d, R_DEVICE_ID) : 0;
        kprintf("virtioprobe: device %u at 0x%lx irq %u type %u\n", i, d->base, d->irq, d->type);
    }
    initrd_probe();
    for (unsigned i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        if (d->type == T_BLOCK)
            blk_probe(d);
        else if (d->type == T_ENTROPY)
            rng_probe(d);
        else if (d->type == T_NET)
            net = d;
        else if (d->type == T_VSOCK)
            vsock = d;
    }
    if (vsock && vsock_start(vsock))
        vsock = NULL;
    if (net && net_start(net))
        net = NULL;
    while ((net || vsock) && !quit) {
        if (net)
            net_poll(net);
        if (vsock)
            vsock_poll(vsock);
        if (quit)
            break;
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        for (unsigned i = 0; i < ndevs; i++) {
            u32 is = rd(&devs[i], R_INT_STATUS);
            if (is)
                wr(&devs[i], R_INT_ACK, is);
        }
    }
    if (net || vsock)
        kprintf("virtioprobe: served %lu packets\n", served);
    kprintf("virtioprobe: done\n");
}
