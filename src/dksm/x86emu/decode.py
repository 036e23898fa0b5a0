"""An x86-64 instruction decoder for the instructions dksm executes in user space.

On a PVM host (docs/BOOT.md, last section) the host kernel's instruction emulator runs
all guest kernel-mode code and rejects SSE, the XSAVE family and a few system
instructions; the VMM executes those itself (:mod:`dksm.x86emu.execute`).  This
module turns the raw bytes at the guest's RIP into an :class:`Instruction`: which
operation, its register and memory operands, its immediate, and its real length
(KVM reports 15 bytes, whatever the instruction's length).

It decodes 64-bit-mode code only, and only the opcodes in
:data:`dksm.x86emu.opcodes.SPECS`.  Anything else raises :class:`DecodeError` with a
reason; :func:`instruction_shape` still measures any legacy-SIMD or x87 instruction
(so an optional general emulator can be given exactly one instruction).  Facts from
the Intel SDM volume 2, chapter 2 (instruction format) and appendix A (opcode maps);
no code from elsewhere.
"""

from __future__ import annotations

from dksm.error import DksmError
from dksm.value import Value
from dksm.x86emu.opcodes import (
    ADDRESS_SIZE,
    LOCK,
    MAP_0F,
    MAP_0F3A,
    MAP_0F38,
    MAP_ONE,
    MAX_INSTRUCTION_LENGTH,
    MEMORY_ONLY,
    NO_PREFIX,
    NO_REGISTER,
    P66,
    PF2,
    PF3,
    REGISTER_ONLY,
    RIP_BASE,
    SEGMENT_PREFIXES,
    SPECS,
    Spec,
)


class DecodeError(DksmError):
    """The bytes are not an instruction this decoder knows."""


class Memory(Value):
    """A memory operand: ``segment:[base + index * scale + disp]``."""

    __slots__ = ("address32", "base", "disp", "index", "scale", "segment")

    def __init__(
        self,
        base: int,
        index: int,
        scale: int,
        disp: int,
        segment: str,
        address32: bool,
    ) -> None:
        self.base = base
        self.index = index
        self.scale = scale
        self.disp = disp
        self.segment = segment
        self.address32 = address32

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


class Instruction(Value):
    """A decoded instruction.

    ``reg`` is ModRM.reg extended by REX.R, ``rm`` ModRM.rm extended by REX.B when
    the operand is a register (else ``NO_REGISTER`` and ``memory`` is set).
    ``opcode`` is (map, opcode byte, mandatory prefix).
    """

    __slots__ = (
        "code",
        "immediate",
        "length",
        "lock",
        "memory",
        "opcode",
        "operand16",
        "reg",
        "rex_w",
        "rm",
        "spec",
    )

    def __init__(
        self,
        spec: Spec,
        length: int,
        opcode: tuple[int, int, int],
        reg: int,
        rm: int,
        memory: Memory | None,
        immediate: int,
        rex_w: bool,
        operand16: bool,
        lock: bool,
        code: bytes,
    ) -> None:
        self.spec = spec
        self.length = length
        self.opcode = opcode
        self.reg = reg
        self.rm = rm
        self.memory = memory
        self.immediate = immediate
        self.rex_w = rex_w
        self.operand16 = operand16
        self.lock = lock
        self.code = code

    @property
    def mnemonic(self) -> str:
        return self.spec.mnemonic


GPR_NAMES = (
    *("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"),
    *(f"r{n}" for n in range(8, 16)),
)


# Opcodes of the 0F map that take an imm8 (for measuring any SIMD instruction).
_IMM8_0F = frozenset({0x70, 0x71, 0x72, 0x73, 0xA4, 0xAC, 0xBA, 0xC2, 0xC4, 0xC5, 0xC6})
# 0F opcodes without a ModRM byte (system and control-flow instructions).
_NO_MODRM_0F = frozenset(
    {0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x0E, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x37, 0x77}
    | set(range(0x80, 0x90))
    | {0xA0, 0xA1, 0xA2, 0xA8, 0xA9, 0xAA}
    | set(range(0xC8, 0xD0))
)


class _Prefixes(Value):
    __slots__ = ("address32", "end", "lock", "mandatory", "operand16", "rex", "segment")

    def __init__(
        self,
        # index of the first opcode byte
        end: int,
        mandatory: int,
        operand16: bool,
        address32: bool,
        segment: str,
        lock: bool,
        rex: int,
    ) -> None:
        self.end = end
        self.mandatory = mandatory
        self.operand16 = operand16
        self.address32 = address32
        self.segment = segment
        self.lock = lock
        self.rex = rex


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


class Shape(Value):
    """The length and kind of a SIMD or x87 instruction this decoder does not execute."""

    __slots__ = ("kind", "length")

    def __init__(
        self,
        length: int,
        kind: str,
    ) -> None:
        self.length = length
        self.kind = kind


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
