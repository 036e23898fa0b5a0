/* compute: a fixed amount of real work, with a result Python can recompute.
 *
 * Algorithm (all arithmetic modulo 2^64; see guests/README.md for a reference
 * implementation in Python):
 *
 *   seed  = 0x0123456789abcdef
 *   state = seed
 *   h     = 0xcbf29ce484222325                      (FNV-1a 64 offset basis)
 *   repeat ROUNDS times (ROUNDS = 10, or "rounds=N" on the command line):
 *       for i in 0..511:                            (a 4096-byte buffer)
 *           state ^= state << 13; state ^= state >> 7; state ^= state << 17
 *           buf[i] = state                          (stored little-endian)
 *       for each of the 4096 bytes c of buf, in memory order:
 *           h ^= c; h *= 0x100000001b3              (FNV-1a 64)
 *       state ^= h
 *       if state == 0: state = seed
 *   checksum = h
 *
 * Output:
 *   compute: dksm guest kit
 *   compute: rounds=<ROUNDS>
 *   compute: checksum=0x<h as 16 hex digits>
 *   compute: done
 *
 * Cost: about 30,000 instructions per round (the FNV loop dominates), so
 * about 300,000 for the default 10 rounds.
 */
#include <dksm/kit.h>

#define COMPUTE_SEED 0x0123456789abcdefUL
#define COMPUTE_WORDS 512
#define COMPUTE_ROUNDS 10

static u64 compute_buf[COMPUTE_WORDS];

static u64 compute(u64 rounds)
{
    u64 state = COMPUTE_SEED;
    u64 h = FNV64_OFFSET;
    for (u64 r = 0; r < rounds; r++) {
        for (unsigned i = 0; i < COMPUTE_WORDS; i++) {
            state = xorshift64(state);
            compute_buf[i] = state;
        }
        h = fnv1a64(h, compute_buf, sizeof(compute_buf));
        state ^= h;
        if (state == 0)
            state = COMPUTE_SEED;
    }
    return h;
}

DKSM_APP_MAIN
{
    kit_banner("compute");
    u64 rounds = kit_cmdline_u64("rounds", COMPUTE_ROUNDS);
    kprintf("compute: rounds=%lu\n", rounds);
    kprintf("compute: checksum=0x%016lx\n", compute(rounds));
    kprintf("compute: done\n");
    /* returning shuts down, or idles with then=idle (kit_start) */
}
