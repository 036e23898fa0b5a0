"""An x86-64 instruction decoder for the instructions dksm executes in user space.

On a PVM host (docs/BOOT.md, last section) the host kernel's instruction emulator runs
all guest kernel-mode code and rejects SSE, the XSAVE family and a few system
instructions; the VMM executes those itself (:mod:`dksm.x86emu.execute`).  This
module turns the raw bytes at the guest's RIP into an :class:`Instruction`: which
operation, its register and memory operands, its immediate, and its real length
(KVM reports 15 bytes, whatever the instruction's length).

It decodes 64-bit-mode code only, and only the opcodes in :data:`SPECS`.  Anything
else raises :class:`DecodeError` with a reason; :func:`instruction_shape` still
measures any legacy-SIMD or x87 instruction (so an optional general emulator can be
given exactly one instruction).  Facts from the Intel SDM volume 2, chapter 2
(instruction format) and appendix A (opcode maps); no code from elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from dksm.error import DksmError

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


class DecodeError(DksmError):
    """The bytes are not an instruction this decoder knows."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One instruction form: its mnemonic and how its encoding continues.

    ``group`` is the ModRM.reg digit that selects it (``/digit`` in the SDM),
    ``rm`` the exact ModRM byte's rm field for register-only forms such as
    ``xgetbv`` (0F 01 D0), ``operand`` which ModRM.rm kinds are valid.
    """

    mnemonic: str
    immediate: int = 0
    operand: int = ANY
    group: int = -1
    rm: int = -1
    lockable: bool = False
    modrm: bool = True  # False: the opcode is the whole instruction (fwait)


@dataclass(frozen=True, slots=True)
class Memory:
    """A memory operand: ``segment:[base + index * scale + disp]``."""

    base: int
    index: int
    scale: int
    disp: int
    segment: str
    address32: bool

    def describe(self) -> str:
        parts = []
        if self.base == RIP_BASE:
            parts.append("rip")
        elif self.base != NO_REGISTER:
            parts.append(GPR_NAMES[self.base])
        if self.index != NO_REGISTER:
            parts.append(f"{GPR_NAMES[self.index]}*{self.scale}")
        text = " + ".join(parts)
        if self.disp or not text:
            text = (
                f"{text} {'-' if self.disp < 0 else '+'} {abs(self.disp):#x}"
                if text
                else (f"{self.disp:#x}")
            )
        prefix = f"{self.segment}:" if self.segment in ("fs", "gs") else ""
        return f"{prefix}[{text}]"


@dataclass(frozen=True, slots=True)
class Instruction:
    """A decoded instruction.

    ``reg`` is ModRM.reg extended by REX.R, ``rm`` ModRM.rm extended by REX.B when
    the operand is a register (else ``NO_REGISTER`` and ``memory`` is set).
    ``opcode`` is (map, opcode byte, mandatory prefix).
    """

    spec: Spec
    length: int
    opcode: tuple[int, int, int]
    reg: int
    rm: int
    memory: Memory | None
    immediate: int
    rex_w: bool
    operand16: bool
    lock: bool
    code: bytes

    @property
    def mnemonic(self) -> str:
        return self.spec.mnemonic


GPR_NAMES = (
    *("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"),
    *(f"r{n}" for n in range(8, 16)),
)


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

# Opcodes of the 0F map that take an imm8 (for measuring any SIMD instruction).
_IMM8_0F = frozenset({0x70, 0x71, 0x72, 0x73, 0xA4, 0xAC, 0xBA, 0xC2, 0xC4, 0xC5, 0xC6})
# 0F opcodes without a ModRM byte (system and control-flow instructions).
_NO_MODRM_0F = frozenset(
    {0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x0E, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x37, 0x77}
    | set(range(0x80, 0x90))
    | {0xA0, 0xA1, 0xA2, 0xA8, 0xA9, 0xAA}
    | set(range(0xC8, 0xD0))
)


@dataclass(frozen=True, slots=True)
class _Prefixes:
    end: int  # index of the first opcode byte
    mandatory: int
    operand16: bool
    address32: bool
    segment: str
    lock: bool
    rex: int


def _prefixes(code: bytes) -> _Prefixes:
    i = 0
    last_rep = 0
    operand16 = address32 = lock = False
    segment = "ds"
    rex = 0
    while i < len(code):
        b = code[i]
        if 0x40 <= b <= 0x4F:
            rex = b  # counts only if the opcode follows directly
            i += 1
            continue
        if b == 0x66:
            operand16 = True
        elif b in (PF2, PF3):
            last_rep = b
        elif b == ADDRESS_SIZE:
            address32 = True
        elif b == LOCK:
            lock = True
        elif b in SEGMENT_PREFIXES:
            segment = SEGMENT_PREFIXES[b]
        else:
            break
        rex = 0  # a legacy prefix after REX voids it
        i += 1
    mandatory = last_rep or (P66 if operand16 else NO_PREFIX)
    return _Prefixes(i, mandatory, operand16, address32, segment, lock, rex)


def _need(code: bytes, size: int, what: str) -> None:
    if len(code) < size or size > MAX_INSTRUCTION_LENGTH:
        raise DecodeError(f"instruction bytes end inside the {what}")


def _modrm(
    code: bytes, at: int, rex: int, segment: str, address32: bool
) -> tuple[int, int, int, Memory | None, int]:
    """Decode ModRM (and SIB, displacement) at ``at``.

    Returns (mod, reg, rm register or NO_REGISTER, memory operand, next index).
    """
    _need(code, at + 1, "ModRM byte")
    modrm = code[at]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    reg |= (rex & 4) << 1
    at += 1
    if mod == 3:
        return mod, reg, rm | ((rex & 1) << 3), None, at
    base = rm | ((rex & 1) << 3)
    index = NO_REGISTER
    scale = 1
    if rm == 4:
        _need(code, at + 1, "SIB byte")
        sib = code[at]
        at += 1
        scale = 1 << (sib >> 6)
        index = ((sib >> 3) & 7) | ((rex & 2) << 2)
        if index == 4:  # rsp cannot be an index: "none"
            index = NO_REGISTER
        base = (sib & 7) | ((rex & 1) << 3)
        if mod == 0 and sib & 7 == 5:
            base = NO_REGISTER
            mod = 2  # a disp32 follows, as with mod 2
    elif mod == 0 and rm == 5:
        base = RIP_BASE
        mod = 2
    disp = 0
    if mod == 1:
        _need(code, at + 1, "displacement")
        disp = int.from_bytes(code[at : at + 1], "little", signed=True)
        at += 1
    elif mod == 2:
        _need(code, at + 4, "displacement")
        disp = int.from_bytes(code[at : at + 4], "little", signed=True)
        at += 4
    return 0, reg, NO_REGISTER, Memory(base, index, scale, disp, segment, address32), at


def _opcode(code: bytes, at: int) -> tuple[int, int, int]:
    """(map, opcode byte, index after it) at ``at``."""
    _need(code, at + 1, "opcode")
    if code[at] != 0x0F:
        return MAP_ONE, code[at], at + 1
    _need(code, at + 2, "opcode")
    if code[at + 1] == 0x38:
        _need(code, at + 3, "opcode")
        return MAP_0F38, code[at + 2], at + 3
    if code[at + 1] == 0x3A:
        _need(code, at + 3, "opcode")
        return MAP_0F3A, code[at + 2], at + 3
    return MAP_0F, code[at + 1], at + 2


def _select(specs: tuple[Spec, ...], is_register: bool, reg: int, rm: int) -> Spec | None:
    for spec in specs:
        if spec.operand == MEMORY_ONLY and is_register:
            continue
        if spec.operand == REGISTER_ONLY and not is_register:
            continue
        if spec.group >= 0 and spec.group != reg & 7:
            continue
        if spec.rm >= 0 and spec.rm != rm & 7:
            continue
        return spec
    return None


def decode(code: bytes) -> Instruction:
    """Decode the instruction at the start of ``code`` (up to 15 bytes)."""
    code = bytes(code[:MAX_INSTRUCTION_LENGTH])
    p = _prefixes(code)
    _need(code, p.end + 1, "opcode")
    first = code[p.end]
    if first in (0xC4, 0xC5):
        raise DecodeError("VEX-encoded (AVX) instructions are not emulated")
    if first == 0x62:
        raise DecodeError("EVEX-encoded (AVX-512) instructions are not emulated")
    opmap, opcode, at = _opcode(code, p.end)
    key = (opmap, opcode, p.mandatory)
    specs = SPECS.get(key)
    if specs is None:
        raise DecodeError(_unsupported(key))
    if not specs[0].modrm:
        return Instruction(
            spec=specs[0],
            length=at,
            opcode=key,
            reg=0,
            rm=NO_REGISTER,
            memory=None,
            immediate=0,
            rex_w=bool(p.rex & 8),
            operand16=p.operand16,
            lock=p.lock,
            code=code[:at],
        )
    _, reg, rm, memory, at = _modrm(code, at, p.rex, p.segment, p.address32)
    spec = _select(specs, memory is None, reg, rm)
    if spec is None:
        form = "register" if memory is None else "memory"
        raise DecodeError(
            f"no emulation for opcode {_describe_opcode(key)} /{reg & 7} with a {form} operand"
        )
    if p.lock and not spec.lockable:
        raise DecodeError(f"a lock prefix on {spec.mnemonic} is invalid (#UD)")
    _need(code, at + spec.immediate, "immediate")
    immediate = int.from_bytes(code[at : at + spec.immediate], "little")
    at += spec.immediate
    return Instruction(
        spec=spec,
        length=at,
        opcode=key,
        reg=reg,
        rm=rm,
        memory=memory,
        immediate=immediate,
        rex_w=bool(p.rex & 8),
        operand16=p.operand16,
        lock=p.lock,
        code=code[:at],
    )


# 0F-map opcodes of SSE floating-point arithmetic, conversion and comparison.  They
# are left out on purpose: their MXCSR exception flags (and unmasked exceptions)
# would have to be reproduced bit for bit, and that is a floating-point library.
_FLOAT_0F = frozenset(
    {0x2A, 0x2C, 0x2D, 0x2E, 0x2F, 0x51, 0x52, 0x53, 0x58, 0x59, 0x5A, 0x5B, 0x5C, 0x5D}
    | {0x5E, 0x5F, 0x7C, 0x7D, 0xC2, 0xD0, 0xE6}
)


def _unsupported(key: tuple[int, int, int]) -> str:
    opmap, opcode, prefix = key
    what = f"opcode {_describe_opcode(key)}"
    if opmap == MAP_0F and opcode in _FLOAT_0F:
        return f"{what}: floating-point SSE arithmetic is not emulated"
    if opmap == MAP_0F and (0x60 <= opcode <= 0x7F or opcode >= 0xD0) and prefix == NO_PREFIX:
        return f"{what}: MMX instructions are not emulated"
    if opmap in (MAP_0F38, MAP_0F3A):
        return f"{what}: SSSE3/SSE4 instructions are not emulated"
    if opmap == MAP_ONE and 0xD8 <= opcode <= 0xDF:
        return f"{what}: x87 instructions are not emulated"
    return f"no emulation for {what}"


def _describe_opcode(key: tuple[int, int, int]) -> str:
    opmap, opcode, prefix = key
    escape = ("", "0f ", "0f 38 ", "0f 3a ")[opmap]
    mandatory = f"{prefix:02x} " if prefix else ""
    return f"{mandatory}{escape}{opcode:02x}".strip()


# The kinds :func:`instruction_shape` tells apart.
XMM_INTEGER = "xmm-integer"  # integer, shuffle and move operations on XMM registers
XMM_FLOAT = "xmm-float"  # floating-point arithmetic: MXCSR exception flags
MMX = "mmx"  # MMX registers alias the x87 stack
X87 = "x87"

# 0F 3A opcodes that do floating-point arithmetic (round*, dpps, dppd).
_FLOAT_0F3A = frozenset({0x08, 0x09, 0x0A, 0x0B, 0x40, 0x41})


@dataclass(frozen=True, slots=True)
class Shape:
    """The length and kind of a SIMD or x87 instruction this decoder does not execute."""

    length: int
    kind: str


_SIMD_0F = frozenset(
    set(range(0x10, 0x18))
    | set(range(0x28, 0x30))
    | set(range(0x50, 0x80))
    | {0xC2, 0xC4, 0xC5, 0xC6}
    | set(range(0xD0, 0x100))
)


def instruction_shape(code: bytes) -> Shape | None:
    """Length and kind of a legacy-encoded SIMD or x87 instruction, else None.

    Enough to hand exactly one instruction to a general emulator; not a full
    length decoder (other one-byte-map and system instructions give None).
    """
    code = bytes(code[:MAX_INSTRUCTION_LENGTH])
    try:
        p = _prefixes(code)
        _need(code, p.end + 1, "opcode")
        if code[p.end] in (0xC4, 0xC5, 0x62) or p.lock:
            return None
        opmap, opcode, at = _opcode(code, p.end)
        if opmap == MAP_ONE:
            if not 0xD8 <= opcode <= 0xDF:
                return None
            _, _, _, _, at = _modrm(code, at, p.rex, p.segment, p.address32)
            return Shape(at, X87)
        if opmap == MAP_0F and (opcode in _NO_MODRM_0F or opcode not in _SIMD_0F):
            return None
        _, _, _, _, at = _modrm(code, at, p.rex, p.segment, p.address32)
        if opmap == MAP_0F3A or (opmap == MAP_0F and opcode in _IMM8_0F):
            at += 1
        _need(code, at, "immediate")
        if (opmap == MAP_0F and opcode in _FLOAT_0F) or (
            opmap == MAP_0F3A and opcode in _FLOAT_0F3A
        ):
            kind = XMM_FLOAT
        elif p.mandatory == NO_PREFIX and (
            opmap != MAP_0F or 0x60 <= opcode <= 0x7F or opcode >= 0xD0 or opcode in (0xC4, 0xC5)
        ):
            kind = MMX
        else:
            kind = XMM_INTEGER
        return Shape(at, kind)
    except DecodeError:
        return None
