#!/usr/bin/env python3
"""Generate the guest kit's "library bank": C code that stands in for the many
libraries a real unikernel links (allocators, schedulers, network and file
system stacks, ...).

The output is deterministic: it depends only on the parameters below (a fixed
seed drives our own splitmix64 generator; Python's `random` is not used so the
output cannot change with the Python version).  Every generated function is
real, compilable, terminating C that never faults (all table indices are
masked), and is reachable through a function table, so it is kept by the
compiler and linker.  None of it runs at boot.

Usage: gen_bank.py OUTDIR   (writes bank_NN.c and bank_index.c)
"""

from __future__ import annotations

import sys
from pathlib import Path

SEED = 0xD5C5_2024_0001
MODULES = (
    "alloc",
    "sched",
    "netdev",
    "ipv4",
    "tcp",
    "udp",
    "vfs",
    "ramfs",
    "time",
    "sync",
    "crypto",
    "inflate",
    "json",
    "regex",
    "ring",
    "virtio",
)
FUNCS_PER_MODULE = 84
MASK64 = (1 << 64) - 1


class Rng:
    """splitmix64: small, well-known, and fully specified here."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.u64() % n

    def between(self, lo: int, hi: int) -> int:
        """Inclusive range."""
        return lo + self.below(hi - lo + 1)

    def pick(self, seq):  # type: ignore[no-untyped-def]
        return seq[self.below(len(seq))]

    def odd(self) -> int:
        return self.u64() | 1

    def perm(self, n: int) -> list[int]:
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            p[i], p[j] = p[j], p[i]
        return p


def c64(v: int) -> str:
    return f"0x{v & MASK64:016x}UL"


def table(
    ctype: str, name: str, values: list[int], width: int, per_line: int, const: bool = True
) -> str:
    rows = []
    for i in range(0, len(values), per_line):
        rows.append("    " + ", ".join(f"0x{v:0{width}x}" for v in values[i : i + per_line]) + ",")
    q = "static const " if const else "static "
    return f"{q}{ctype} {name}[{len(values)}] = {{\n" + "\n".join(rows) + "\n};\n"


VERBS = (
    "init",
    "step",
    "mix",
    "scan",
    "probe",
    "fold",
    "push",
    "pop",
    "hash",
    "map",
    "lookup",
    "tick",
    "encode",
    "decode",
    "check",
    "merge",
    "split",
    "update",
)


class Module:
    def __init__(self, rng: Rng, index: int, name: str) -> None:
        self.rng = rng
        self.index = index
        self.name = name
        self.p = f"lb_{name}"
        self.funcs: list[str] = []
        self.out: list[str] = []

    # ---- helpers used by templates -------------------------------------
    def arith_op(self, x: str, y: str) -> str:
        r = self.rng
        k = r.below(11)
        s1, s2 = r.between(1, 63), r.between(1, 63)
        if k == 0:
            return f"{x} += {y} ^ {c64(r.u64())};"
        if k == 1:
            return f"{y} ^= {x} >> {s1};"
        if k == 2:
            return f"{x} = rotl64({x}, {s1}) * {c64(r.odd())};"
        if k == 3:
            return f"{y} = ({y} << {s1}) | ({x} >> {64 - s1});"
        if k == 4:
            m = r.u64()
            return f"{x} ^= ({y} & {c64(m)}) | (~{y} & {c64(r.u64())});"
        if k == 5:
            return f"if ({x} & (1UL << {s1})) {y} += {c64(r.u64())}; else {y} -= {x} >> {s2};"
        if k == 6:
            return f"{x} -= ({y} >> {s1}) + {c64(r.u64())};"
        if k == 7:
            return f"{x} = ({x} >> {s1}) ^ ({x} << {s2}) ^ {y};"
        if k == 8:
            return f"{y} = {y} * {c64(r.odd())} + {x};"
        if k == 9:
            return f"{x} = (u64)(u32){x} * (u32){y} + ({x} >> 32);"
        return f"{y} = {y} < {x} ? {y} + {c64(r.u64())} : {y} - ({x} & {c64(r.u64())});"

    def new_name(self) -> str:
        n = len(self.funcs)
        name = f"{self.p}_{VERBS[self.rng.below(len(VERBS))]}_{n}"
        self.funcs.append(name)
        return name

    # ---- templates -------------------------------------------------------
    def t_arith(self) -> str:
        r = self.rng
        name = self.new_name()
        body = [f"    u64 x = a ^ {c64(r.u64())}, y = b + {c64(r.u64())};"]
        for _ in range(r.between(8, 18)):
            body.append("    " + self.arith_op(*r.pick((("x", "y"), ("y", "x")))))
        body.append(f"    return x ^ rotl64(y, {r.between(1, 63)});")
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_lookup(self) -> str:
        r = self.rng
        name = self.new_name()
        n = r.between(4, 12)
        s = r.pick((3, 5, 7, 8, 11, 13))
        body = [
            f"    u64 h = b ^ {c64(r.u64())};",
            f"    for (unsigned i = 0; i < {n}; i++) {{",
            f"        u8 c = (u8)(a >> ((i * {s}) & 63));",
            f"        h = (h << {r.between(1, 15)}) ^ (h >> {r.between(1, 31)}) ^ "
            f"{self.p}_w32[(c ^ h) & 1023] ^ {self.p}_sbox[(u8)(c + i)];",
            "        " + self.arith_op("h", "a"),
        ]
        if r.below(2):
            body.append(f"        h += {self.p}_w16[(h >> {r.between(0, 40)}) & 127];")
        body += ["    }", f"    return h + {self.p}_k64[(h >> {r.between(0, 50)}) & 31];"]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_fsm(self) -> str:
        r = self.rng
        name = self.new_name()
        k = r.between(4, 11)
        body = [
            f"    unsigned st = (unsigned)(b % {k}U);",
            f"    u64 acc = {c64(r.u64())};",
            f"    for (unsigned i = 0; i < {r.pick((8, 12, 16))}; i++) {{",
            "        unsigned sym = (unsigned)(a >> (4 * i)) & 15;",
            "        switch (st) {",
        ]
        for s in range(k):
            t = r.between(1, 15)
            s1, s2 = r.below(k), r.below(k)
            body.append(f"        case {s}:")
            body.append(f"            if (sym < {t}) {{")
            body.append(f"                st = {s1};")
            body.append("                " + self.arith_op("acc", "b"))
            body.append("            } else {")
            body.append(f"                st = {s2};")
            body.append(f"                acc ^= rotl64(acc, {r.between(1, 63)}) + sym;")
            body.append("            }")
            body.append("            break;")
        body += [
            "        default:",
            "            st = 0;",
            "            break;",
            "        }",
            "    }",
            "    return acc ^ ((u64)st << 56);",
        ]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_state(self) -> str:
        r = self.rng
        name = self.new_name()
        body = [
            f"    unsigned i = (unsigned)(a >> {r.between(0, 20)}) & 31;",
            f"    u64 old = {self.p}_state[i];",
            f"    {self.p}_state[i] = old * {c64(r.odd())} + b;",
            f"    {self.p}_counters[(b >> {r.between(0, 9)}) & 63] += "
            f"(u32)a ^ {r.u64() & 0xFFFFFFFF:#x}U;",
            f"    u64 s = {self.p}_scratch[(a ^ b) & 63];",
            "    " + self.arith_op("s", "old"),
            f"    {self.p}_scratch[(a + {r.between(1, 63)}) & 63] = s;",
            f"    return old ^ s ^ {self.p}_counters[i];",
        ]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_parse(self) -> str:
        """Parse the bytes of `a` as text: digits, letters, separators."""
        r = self.rng
        name = self.new_name()
        base = r.pick((8, 10, 16, 36))
        body = [
            f"    u64 v = 0, acc = b ^ {c64(r.u64())};",
            "    unsigned fields = 0;",
            "    for (unsigned i = 0; i < 8; i++) {",
            "        unsigned ch = (unsigned)(a >> (8 * i)) & 0xff;",
            "        unsigned d;",
            "        if (ch >= '0' && ch <= '9')",
            "            d = ch - '0';",
            "        else if (ch >= 'a' && ch <= 'z')",
            "            d = ch - 'a' + 10;",
            f"        else if (ch == {r.pick((32, 44, 47, 58, 59, 61))}) {{",
            "            acc = acc * 31 + v;",
            "            v = 0;",
            "            fields++;",
            "            continue;",
            "        } else",
            f"            d = {self.p}_sbox[ch] % {base}U;",
            f"        if (d >= {base}U)",
            f"            d %= {base}U;",
            f"        v = v * {base} + d;",
            "    }",
            "    " + self.arith_op("acc", "v"),
            "    return acc + v + fields;",
        ]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_bits(self) -> str:
        r = self.rng
        name = self.new_name()
        body = [
            f"    u64 x = a ^ (b * {c64(r.odd())});",
            "    unsigned pop = 0, runs = 0, last = 0;",
            f"    for (unsigned i = 0; i < 64; i += {r.pick((1, 2, 4))}) {{",
            "        unsigned bit = (unsigned)(x >> i) & 1;",
            "        pop += bit;",
            "        runs += bit != last;",
            "        last = bit;",
            "    }",
            f"    u64 y = b + {c64(r.u64())};",
            "    " + self.arith_op("y", "x"),
            f"    return y ^ ((u64)pop << {r.between(0, 40)}) ^ ((u64)runs << {r.between(0, 40)});",
        ]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_ring(self) -> str:
        """A little queue on a module-private ring buffer."""
        r = self.rng
        name = self.new_name()
        body = [
            f"    struct {self.p}_ring *q = &{self.p}_rings[(a >> {r.between(0, 12)}) & 3];",
            f"    if ((b & {r.between(1, 7)}) != 0 && q->count < 16) {{",
            "        q->slot[q->head] = a ^ b;",
            "        q->head = (q->head + 1) & 15;",
            "        q->count++;",
            f"        return q->count * {c64(r.u64())};",
            "    }",
            "    if (q->count == 0)",
            f"        return {c64(r.u64())} ^ b;",
            "    u64 v = q->slot[q->tail];",
            "    q->tail = (q->tail + 1) & 15;",
            "    q->count--;",
            "    " + self.arith_op("v", "b"),
            "    return v;",
        ]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def t_call(self) -> str:
        r = self.rng
        prev = list(self.funcs)
        name = self.new_name()
        n = r.between(2, 4)
        calls = [r.pick(prev) for _ in range(n)]
        expr = []
        for i, f in enumerate(calls):
            a = r.pick(("a", "b", "x", f"a ^ {c64(r.u64())}", f"x + {c64(r.u64())}"))
            b = r.pick(("b", "a", "x", f"b + {i + 1}", f"rotl64(x, {r.between(1, 63)})"))
            expr.append(f"    x ^= {f}({a}, {b});")
            if r.below(2):
                expr.append("    " + self.arith_op("x", "a"))
        body = [f"    u64 x = a + {c64(r.u64())};", *expr, "    return x;"]
        return f"static u64 {name}(u64 a, u64 b)\n{{\n" + "\n".join(body) + "\n}\n"

    def generate(self, nfuncs: int) -> str:
        r = self.rng
        p = self.p
        hdr = [
            f"/* Generated by guests/gen_bank.py (seed {SEED:#x}):",
            f" * library bank module '{self.name}'.  Do not edit; regenerate. */",
            "#include <dksm/kit.h>",
            "",
            "static inline u64 rotl64(u64 x, unsigned r)",
            "{",
            "    return (x << (r & 63)) | (x >> ((64 - r) & 63));",
            "}",
            "",
            table("u8", f"{p}_sbox", r.perm(256), 2, 16),
            table("u16", f"{p}_w16", [r.u64() & 0xFFFF for _ in range(128)], 4, 12),
            table("u32", f"{p}_w32", [r.u64() & 0xFFFFFFFF for _ in range(1024)], 8, 8),
            table("u64", f"{p}_k64", [r.u64() for _ in range(32)], 16, 4),
            table("u64", f"{p}_state", [r.u64() for _ in range(32)], 16, 4, const=False),
            table(
                "u32", f"{p}_counters", [r.u64() & 0xFFFFFFFF for _ in range(64)], 8, 8, const=False
            ),
            f"static u64 {p}_scratch[64];",
            f"struct {p}_ring {{",
            "    u64 slot[16];",
            "    unsigned head, tail, count;",
            "};",
            f"static struct {p}_ring {p}_rings[4];",
            "",
        ]
        templates = (
            self.t_arith,
            self.t_lookup,
            self.t_fsm,
            self.t_state,
            self.t_parse,
            self.t_bits,
            self.t_ring,
        )
        funcs = []
        # First a few leaf functions so that t_call has callees.
        for i in range(nfuncs):
            if i >= 8 and r.below(6) == 0:
                funcs.append(self.t_call())
            else:
                funcs.append(r.pick(templates)())
        tail = [
            f"const bank_fn_t {p}_table[{len(self.funcs)}] = {{",
            *[f"    {f}," for f in self.funcs],
            "};",
            "",
        ]
        return "\n".join(hdr) + "\n" + "\n".join(funcs) + "\n" + "\n".join(tail)


def generate(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    rng = Rng(SEED)
    written = []
    counts = []
    for i, name in enumerate(MODULES):
        m = Module(rng, i, name)
        text = m.generate(FUNCS_PER_MODULE)
        counts.append((m.p, len(m.funcs)))
        path = outdir / f"bank_{i:02d}_{name}.c"
        _write(path, text)
        written.append(path)
    idx = [
        f"/* Generated by guests/gen_bank.py (seed {SEED:#x}): library bank index. */",
        "#include <dksm/kit.h>",
        "",
    ]
    for p, n in counts:
        idx.append(f"extern const bank_fn_t {p}_table[{n}];")
    idx += [
        "",
        "struct bank_module {",
        "    const char *name;",
        "    const bank_fn_t *fns;",
        "    unsigned count;",
        "};",
        "",
        f"static const struct bank_module bank_modules[{len(counts)}] = {{",
    ]
    for (p, n), name in zip(counts, MODULES, strict=True):
        idx.append(f'    {{"{name}", {p}_table, {n}}},')
    total = sum(n for _, n in counts)
    idx += [
        "};",
        "",
        f"unsigned bank_count(void) {{ return {total}U; }}",
        "",
        "static const struct bank_module *bank_find(unsigned *idx)",
        "{",
        "    for (unsigned m = 0; m < ARRAY_SIZE(bank_modules); m++) {",
        "        if (*idx < bank_modules[m].count)",
        "            return &bank_modules[m];",
        "        *idx -= bank_modules[m].count;",
        "    }",
        "    return NULL;",
        "}",
        "",
        "u64 bank_call(unsigned idx, u64 a, u64 b)",
        "{",
        "    const struct bank_module *m = bank_find(&idx);",
        "    return m ? m->fns[idx](a, b) : 0;",
        "}",
        "",
        "const char *bank_module_name(unsigned idx)",
        "{",
        "    const struct bank_module *m = bank_find(&idx);",
        '    return m ? m->name : "?";',
        "}",
        "",
        "/* Call functions first..first+n-1 once each and fold the results. */",
        "u64 bank_selftest(unsigned first, unsigned n, u64 seed)",
        "{",
        "    u64 h = seed;",
        "    for (unsigned i = first; i < first + n && i < bank_count(); i++)",
        "        h = (h ^ bank_call(i, h, (u64)i * 0x9e3779b97f4a7c15UL)) * FNV64_PRIME;",
        "    return h;",
        "}",
        "",
    ]
    path = outdir / "bank_index.c"
    _write(path, "\n".join(idx))
    written.append(path)
    return written


def _write(path: Path, text: str) -> None:
    data = text.encode()
    if path.exists() and path.read_bytes() == data:
        return
    path.write_bytes(data)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for p in generate(Path(sys.argv[1])):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
