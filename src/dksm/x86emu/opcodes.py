"""The instruction forms the emulator knows: opcode maps, prefixes and :data:`SPECS`.

Each form is a :class:`Spec` keyed by (opcode map, opcode byte, mandatory prefix);
:mod:`dksm.x86emu.decode` reads instructions against this table and
:mod:`dksm.x86emu.execute` gives each mnemonic its effect.  Facts from the Intel SDM
volume 2, appendix A (opcode maps); no code from elsewhere.
"""

from __future__ import annotations

from dksm.value import Value

MAX_INSTRUCTION_LENGTH = 15

# Opcode maps (SDM vol. 2 appendix A): one-byte, 0F, 0F 38, 0F 3A.
MAP_ONE = 0
MAP_0F = 1
MAP_0F38 = 2
MAP_0F3A = 3

# Mandatory prefixes that select among SSE instructions sharing an opcode.
NO_PREFIX = 0
P66 = 0x66
PF3 = 0xF3
PF2 = 0xF2

# Segment override prefixes; only FS and GS have a base in 64-bit mode.
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
LOCK = 0xF0
ADDRESS_SIZE = 0x67

# A memory operand's base is a general register 0-15 (x86 encoding order), none,
# or the address of the next instruction (RIP-relative).
NO_REGISTER = -1
RIP_BASE = 16

# Operand rules for a spec's ModRM.rm: register only, memory only, either.
ANY = 0
MEMORY_ONLY = 1
REGISTER_ONLY = 2


class Spec(Value):
    """One instruction form: its mnemonic and how its encoding continues.

    ``group`` is the ModRM.reg digit that selects it (``/digit`` in the SDM),
    ``rm`` the exact ModRM byte's rm field for register-only forms such as
    ``xgetbv`` (0F 01 D0), ``operand`` which ModRM.rm kinds are valid.
    """

    __slots__ = ("group", "immediate", "lockable", "mnemonic", "modrm", "operand", "rm")

    def __init__(
        self,
        mnemonic: str,
        immediate: int = 0,
        operand: int = ANY,
        group: int = -1,
        rm: int = -1,
        lockable: bool = False,
        # False: the opcode is the whole instruction (fwait)
        modrm: bool = True,
    ) -> None:
        self.mnemonic = mnemonic
        self.immediate = immediate
        self.operand = operand
        self.group = group
        self.rm = rm
        self.lockable = lockable
        self.modrm = modrm


def _table() -> dict[tuple[int, int, int], tuple[Spec, ...]]:
    """The instruction forms dksm executes, by (map, opcode, mandatory prefix)."""
    table: dict[tuple[int, int, int], list[Spec]] = {}

    def add(opmap: int, opcode: int, prefix: int, spec: Spec) -> None:
        table.setdefault((opmap, opcode, prefix), []).append(spec)

    def sse(
        opcode: int,
        prefix: int,
        mnemonic: str,
        *,
        immediate: int = 0,
        operand: int = ANY,
        group: int = -1,
        rm: int = -1,
        lockable: bool = False,
    ) -> None:
        spec = Spec(mnemonic, immediate, operand, group, rm, lockable)
        add(MAP_0F, opcode, prefix, spec)

    # Moves: loads and stores of whole, low and high parts of XMM registers.
    for prefix, load in ((NO_PREFIX, "movups"), (P66, "movupd"), (PF3, "movss"), (PF2, "movsd")):
        sse(0x10, prefix, load)
        sse(0x11, prefix, load + ".store")
    sse(0x12, NO_PREFIX, "movlps", operand=MEMORY_ONLY)
    sse(0x12, NO_PREFIX, "movhlps", operand=REGISTER_ONLY)
    sse(0x12, P66, "movlpd", operand=MEMORY_ONLY)
    sse(0x13, NO_PREFIX, "movlps.store", operand=MEMORY_ONLY)
    sse(0x13, P66, "movlpd.store", operand=MEMORY_ONLY)
    sse(0x14, NO_PREFIX, "unpcklps")
    sse(0x14, P66, "unpcklpd")
    sse(0x15, NO_PREFIX, "unpckhps")
    sse(0x15, P66, "unpckhpd")
    sse(0x16, NO_PREFIX, "movhps", operand=MEMORY_ONLY)
    sse(0x16, NO_PREFIX, "movlhps", operand=REGISTER_ONLY)
    sse(0x16, P66, "movhpd", operand=MEMORY_ONLY)
    sse(0x17, NO_PREFIX, "movhps.store", operand=MEMORY_ONLY)
    sse(0x17, P66, "movhpd.store", operand=MEMORY_ONLY)
    sse(0x28, NO_PREFIX, "movaps")
    sse(0x28, P66, "movapd")
    sse(0x29, NO_PREFIX, "movaps.store")
    sse(0x29, P66, "movapd.store")
    sse(0x2B, NO_PREFIX, "movntps", operand=MEMORY_ONLY)
    sse(0x2B, P66, "movntpd", operand=MEMORY_ONLY)
    # Bitwise operations on packed floats (no floating-point exceptions).
    for opcode, name in ((0x54, "and"), (0x55, "andn"), (0x56, "or"), (0x57, "xor")):
        sse(opcode, NO_PREFIX, name + "ps")
        sse(opcode, P66, name + "pd")
    # SSE2 integer instructions (66 prefix; without it they are MMX forms).
    integer = {
        0x60: "punpcklbw", 0x61: "punpcklwd", 0x62: "punpckldq", 0x63: "packsswb",
        0x64: "pcmpgtb", 0x65: "pcmpgtw", 0x66: "pcmpgtd", 0x67: "packuswb",
        0x68: "punpckhbw", 0x69: "punpckhwd", 0x6A: "punpckhdq", 0x6B: "packssdw",
        0x6C: "punpcklqdq", 0x6D: "punpckhqdq", 0x6F: "movdqa",
        0x74: "pcmpeqb", 0x75: "pcmpeqw", 0x76: "pcmpeqd",
        0xD1: "psrlw", 0xD2: "psrld", 0xD3: "psrlq", 0xD4: "paddq", 0xD5: "pmullw",
        0xD8: "psubusb", 0xD9: "psubusw", 0xDA: "pminub", 0xDB: "pand",
        0xDC: "paddusb", 0xDD: "paddusw", 0xDE: "pmaxub", 0xDF: "pandn",
        0xE0: "pavgb", 0xE1: "psraw", 0xE2: "psrad", 0xE3: "pavgw", 0xE4: "pmulhuw",
        0xE5: "pmulhw", 0xE8: "psubsb", 0xE9: "psubsw", 0xEA: "pminsw", 0xEB: "por",
        0xEC: "paddsb", 0xED: "paddsw", 0xEE: "pmaxsw", 0xEF: "pxor",
        0xF1: "psllw", 0xF2: "pslld", 0xF3: "psllq", 0xF4: "pmuludq", 0xF5: "pmaddwd",
        0xF6: "psadbw", 0xF8: "psubb", 0xF9: "psubw", 0xFA: "psubd", 0xFB: "psubq",
        0xFC: "paddb", 0xFD: "paddw", 0xFE: "paddd",
    }  # fmt: skip
    for opcode, name in integer.items():
        sse(opcode, P66, name)
    sse(0x6E, P66, "movd")  # movq with REX.W
    sse(0x7E, P66, "movd.store")  # movq with REX.W
    sse(0x7E, PF3, "movq")
    sse(0xD6, P66, "movq.store")
    sse(0x6F, PF3, "movdqu")
    sse(0x7F, P66, "movdqa.store")
    sse(0x7F, PF3, "movdqu.store")
    sse(0xE7, P66, "movntdq", operand=MEMORY_ONLY)
    sse(0xF0, PF2, "lddqu", operand=MEMORY_ONLY)
    sse(0xD7, P66, "pmovmskb", operand=REGISTER_ONLY)
    sse(0x70, P66, "pshufd", immediate=1)
    sse(0x70, PF3, "pshufhw", immediate=1)
    sse(0x70, PF2, "pshuflw", immediate=1)
    sse(0xC6, NO_PREFIX, "shufps", immediate=1)
    sse(0xC6, P66, "shufpd", immediate=1)
    # Shifts by an immediate: groups 12, 13, 14 (66 0F 71/72/73 /digit ib).
    for opcode, digits in (
        (0x71, {2: "psrlw", 4: "psraw", 6: "psllw"}),
        (0x72, {2: "psrld", 4: "psrad", 6: "pslld"}),
        (0x73, {2: "psrlq", 3: "psrldq", 6: "psllq", 7: "pslldq"}),
    ):
        for digit, name in digits.items():
            sse(opcode, P66, name + ".imm", immediate=1, operand=REGISTER_ONLY, group=digit)
    # Group 15 (0F AE): FPU/SSE state save and restore, MXCSR, fences.
    for digit, name in enumerate(
        ("fxsave", "fxrstor", "ldmxcsr", "stmxcsr", "xsave", "xrstor", "xsaveopt")
    ):
        sse(0xAE, NO_PREFIX, name, operand=MEMORY_ONLY, group=digit)
    sse(0xAE, NO_PREFIX, "clflush", operand=MEMORY_ONLY, group=7)
    sse(0xAE, NO_PREFIX, "lfence", operand=REGISTER_ONLY, group=5)
    sse(0xAE, NO_PREFIX, "mfence", operand=REGISTER_ONLY, group=6)
    sse(0xAE, NO_PREFIX, "sfence", operand=REGISTER_ONLY, group=7)
    # Group 7 (0F 01): xgetbv (D0); xsetbv is KVM's to handle.  clac (CA) and stac
    # (CB) toggle SMAP's override around every user-memory access in Linux.
    sse(0x01, NO_PREFIX, "xgetbv", operand=REGISTER_ONLY, group=2, rm=0)
    sse(0x01, NO_PREFIX, "clac", operand=REGISTER_ONLY, group=1, rm=2)
    sse(0x01, NO_PREFIX, "stac", operand=REGISTER_ONLY, group=1, rm=3)
    # Prefetch hints (0F 18 /0-3), non-temporal GPR store, 16-byte compare-exchange.
    for digit, name in enumerate(("prefetchnta", "prefetcht0", "prefetcht1", "prefetcht2")):
        sse(0x18, NO_PREFIX, name, operand=MEMORY_ONLY, group=digit)
    sse(0x0D, NO_PREFIX, "prefetchw", operand=MEMORY_ONLY, group=1)
    sse(0xC3, NO_PREFIX, "movnti", operand=MEMORY_ONLY)
    sse(0xC7, NO_PREFIX, "cmpxchg16b", operand=MEMORY_ONLY, group=1, lockable=True)
    # Bit counts on general registers (F3 0F B8/BC/BD): Linux patches popcnt into
    # hweight*() by alternatives; tzcnt and lzcnt are their neighbours.
    sse(0xB8, PF3, "popcnt")
    sse(0xBC, PF3, "tzcnt")
    sse(0xBD, PF3, "lzcnt")
    # Group 9's compacting save (0F C7 /4): Linux saves its FPU state with it when
    # the CPU has XSAVEC but not XSAVES, as this project's hosts show the guest.
    sse(0xC7, NO_PREFIX, "xsavec", operand=MEMORY_ONLY, group=4)
    # Group 9's random-number forms (0F C7 /6, /7; 66 selects 16-bit): KVM may not
    # execute them where its CPUID list lacks them, yet dksm offers them to guests.
    for prefix in (NO_PREFIX, P66):
        add(MAP_0F, 0xC7, prefix, Spec("rdrand", operand=REGISTER_ONLY, group=6))
        add(MAP_0F, 0xC7, prefix, Spec("rdseed", operand=REGISTER_ONLY, group=7))
    # The x87 instructions Linux itself runs: fwait (after dropping a task's FPU
    # state, to swallow delayed exceptions) and fninit (kernel_fpu_begin).
    add(MAP_ONE, 0x9B, NO_PREFIX, Spec("fwait", modrm=False))
    add(MAP_ONE, 0xDB, NO_PREFIX, Spec("fninit", operand=REGISTER_ONLY, group=4, rm=3))
    return {key: tuple(specs) for key, specs in table.items()}


SPECS = _table()
