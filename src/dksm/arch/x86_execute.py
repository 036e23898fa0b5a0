"""The effect of the instructions :mod:`dksm.arch.x86_decode` knows, on a plain CPU state.

An instruction is executed against a :class:`Cpu`: a register file in
``kvm_regs`` order, control registers, a memory that reads and writes by linear
address, and the x87/SSE/AVX state as an XSAVE area (:class:`VectorState`).  The
VMM backs these by a vCPU and guest RAM (:mod:`dksm.vmm.emulation`); the tests back
them by lists and a ``bytearray`` and compare every result with the same bytes
executed natively on the host.

Invariants the VMM relies on:

- A handler checks everything that can fault (alignment, control-register
  enables, reserved bits, translation of every page it writes) before it changes
  anything, and then raises nothing: an instruction either completes or leaves the
  state untouched and raises :class:`ExecutionError`.  That is what lets the VMM
  stop a batch at the first instruction it cannot finish and hand that one back
  to the guest's own execution.
- Nothing is approximated.  An instruction whose exact architectural result
  cannot be produced here (a fault to deliver, an unknown XCR) raises
  :class:`ExecutionError` instead: the VM stops with a clear reason rather than
  run on with a wrong one.

Facts from the Intel SDM volumes 1 (chapter 13, XSAVE) and 2 (each instruction's
operation section); no code from elsewhere.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Protocol

from dksm.arch.x86_decode import NO_REGISTER, RIP_BASE, Instruction
from dksm.error import DksmError

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1

# Register file indices: struct kvm_regs order (rax rbx rcx rdx rsi rdi rsp rbp
# r8-r15 rip rflags), so a vCPU's registers can be used in place.
RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP = range(8)
RIP = 16
RFLAGS = 17
REGISTER_COUNT = 18
# x86 encoding number (rax rcx rdx rbx rsp rbp rsi rdi r8-r15) -> kvm_regs index.
ENCODING_TO_INDEX = (0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)

FLAG_CF = 1 << 0
FLAG_PF = 1 << 2
FLAG_AF = 1 << 4
FLAG_ZF = 1 << 6
FLAG_SF = 1 << 7
FLAG_TF = 1 << 8
FLAG_OF = 1 << 11
FLAG_AC = 1 << 18

CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR4_OSFXSR = 1 << 9
CR4_OSXSAVE = 1 << 18

# The XSAVE area, standard (non-compacted) format, as KVM_GET_XSAVE returns it.
FCW, FSW, FTW, FOP, FIP, FDP = 0, 2, 4, 6, 8, 16
MXCSR, MXCSR_MASK = 24, 28
ST0 = 32
XMM0 = 160
LEGACY_END = 416  # bytes 416-511 are never written by FXSAVE or XSAVE
XSTATE_BV = 512
XCOMP_BV = 520
HEADER_END = 576
# XCOMP_BV bit 63: the area is in the compacted format (XSAVEC, XSAVES); bits 62-0
# say which components it holds, packed in bit order after the header.
COMPACTED_FORMAT = 1 << 63
COMPACTED_ALIGNMENT = 64
YMM_HI = 576  # state component 2 (AVX): the upper halves of YMM0-15
YMM_HI_END = 832
XSAVE_AREA_SIZE = 4096
FXSAVE_AREA_SIZE = 512

X87_COMPONENT = 1 << 0
SSE_COMPONENT = 1 << 1
AVX_COMPONENT = 1 << 2
# AVX's place in the standard format is the same on every CPU that has it; the
# components after it (AVX-512, PKRU, ...) are placed differently by Intel and AMD,
# so their layout comes from CPUID leaf 0xD.
DEFAULT_LAYOUT = {2: (YMM_HI, YMM_HI_END - YMM_HI)}
# Linux (KVM_SET_XSAVE) takes MXCSR from an area only if one of these is in use.
MXCSR_COMPONENTS = X87_COMPONENT | SSE_COMPONENT | AVX_COMPONENT
MXCSR_RESET = 0x1F80
FCW_RESET = 0x037F


class ExecutionError(DksmError):
    """Executing the instruction would raise a CPU exception, or needs state dksm
    cannot produce exactly; ``exception`` names it (``#GP``, ``#PF``, ``-``)."""

    def __init__(self, exception: str, message: str) -> None:
        super().__init__(f"{exception}: {message}" if exception != "-" else message)
        self.exception = exception


class Registers(Protocol):
    """18 unsigned 64-bit values in ``kvm_regs`` order (a list or a ``memoryview``)."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class VectorState:
    """The x87, SSE and AVX registers, held as an XSAVE area.

    ``layout`` gives the (offset, size) of each extended state component (bit 2 and
    up) in the area's standard format: the host CPU's CPUID leaf 0xD, which is also
    the layout of ``KVM_GET_XSAVE``.  Register accessors mark the components they
    change in ``changed`` (XSAVE component bits), so the VMM writes the area back
    only when it must.
    """

    __slots__ = ("aligned", "area", "changed", "in_use", "layout")

    def __init__(
        self,
        area: bytearray,
        layout: dict[int, tuple[int, int]] | None = None,
        aligned: frozenset[int] = frozenset(),
    ) -> None:
        self.layout = dict(layout) if layout is not None else dict(DEFAULT_LAYOUT)
        # Components that start 64-byte aligned in the compacted format
        # (CPUID.(0xD, i):ECX bit 1).
        self.aligned = aligned
        end = max([HEADER_END, *(offset + size for offset, size in self.layout.values())])
        if len(area) < end:
            raise ValueError(f"an XSAVE area with this layout needs at least {end} bytes")
        self.area = area
        self.changed = 0
        self.in_use = 0
        self.refresh()

    def refresh(self) -> None:
        """Forget changes: the area was just (re)loaded from the CPU.

        ``in_use`` is XINUSE as far as dksm knows it, the area's XSTATE_BV; a
        register write puts its component in use (a set bit is always valid).
        """
        self.changed = 0
        self.in_use = int.from_bytes(self.area[XSTATE_BV : XSTATE_BV + 8], "little")

    def settle(self) -> None:
        """Write ``in_use`` into the area's XSTATE_BV, ready to be loaded into a CPU.

        Linux takes MXCSR from a loaded area only when x87, SSE or AVX is marked
        in use; a changed MXCSR therefore keeps SSE marked (its XMM values are
        in the area, so that is exact).
        """
        if self.changed & SSE_COMPONENT and not self.in_use & MXCSR_COMPONENTS:
            self.in_use |= SSE_COMPONENT
        self.area[XSTATE_BV : XSTATE_BV + 8] = self.in_use.to_bytes(8, "little")

    @classmethod
    def reset(
        cls, layout: dict[int, tuple[int, int]] | None = None, aligned: frozenset[int] = frozenset()
    ) -> VectorState:
        """The state after power-on (FCW 0x37f, MXCSR 0x1f80, registers zero)."""
        area = bytearray(XSAVE_AREA_SIZE)
        struct.pack_into("<H", area, FCW, FCW_RESET)
        struct.pack_into("<II", area, MXCSR, MXCSR_RESET, 0xFFFF)
        return cls(area, layout, aligned)

    def compacted(self, components: int) -> list[tuple[int, int, int, int]]:
        """Where each extended component of ``components`` lies in a compacted area
        whose XCOMP_BV holds ``components``: (bit, offset there, offset in the
        standard-format ``area``, size), in bit order (SDM vol. 1, 13.4.3)."""
        unknown = components & ~self.components & ~COMPACTED_FORMAT
        if unknown:
            raise ExecutionError(
                "-", f"a compacted XSAVE area with components {unknown:#x}, whose layout is unknown"
            )
        placed = []
        at = HEADER_END
        for index, (standard, size) in sorted(self.layout.items()):
            if not components >> index & 1:
                continue
            if index in self.aligned:
                at = -(-at // COMPACTED_ALIGNMENT) * COMPACTED_ALIGNMENT
            placed.append((1 << index, at, standard, size))
            at += size
        return placed

    @property
    def components(self) -> int:
        """The XSAVE components this area can hold: x87, SSE and those in the layout."""
        bits = X87_COMPONENT | SSE_COMPONENT
        for bit in self.layout:
            bits |= 1 << bit
        return bits

    def xmm(self, index: int) -> int:
        offset = XMM0 + 16 * index
        return int.from_bytes(self.area[offset : offset + 16], "little")

    def set_xmm(self, index: int, value: int) -> None:
        offset = XMM0 + 16 * index
        self.area[offset : offset + 16] = value.to_bytes(16, "little")
        self.changed |= SSE_COMPONENT
        self.in_use |= SSE_COMPONENT

    @property
    def mxcsr(self) -> int:
        value: int = struct.unpack_from("<I", self.area, MXCSR)[0]
        return value

    @property
    def mxcsr_mask(self) -> int:
        mask: int = struct.unpack_from("<I", self.area, MXCSR_MASK)[0]
        return mask or 0xFFBF  # zero means the default mask (SDM vol. 1, 11.6.6)

    def set_mxcsr(self, value: int) -> None:
        struct.pack_into("<I", self.area, MXCSR, value)
        self.changed |= SSE_COMPONENT


class Cpu(Protocol):
    """What executing an instruction needs from a CPU."""

    @property
    def regs(self) -> Registers: ...

    @property
    def cr0(self) -> int: ...

    @property
    def cr4(self) -> int: ...

    def segment_base(self, segment: str) -> int:
        """The base of FS or GS (other segments have base 0 in 64-bit mode)."""
        ...

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at linear ``address``; raises :class:`ExecutionError`."""
        ...

    def write(self, address: int, data: bytes) -> None:
        """Store at linear ``address``: all pages checked before any byte is written."""
        ...

    def vector(self) -> VectorState: ...

    def xcr0(self) -> int: ...


Handler = Callable[[Cpu, Instruction], None]


# -- operands ------------------------------------------------------------------


def effective_address(cpu: Cpu, insn: Instruction) -> int:
    """The linear address of the instruction's memory operand."""
    mem = insn.memory
    assert mem is not None
    regs = cpu.regs
    address = mem.disp
    if mem.base == RIP_BASE:
        address += regs[RIP] + insn.length
    elif mem.base != NO_REGISTER:
        address += regs[ENCODING_TO_INDEX[mem.base]]
    if mem.index != NO_REGISTER:
        address += regs[ENCODING_TO_INDEX[mem.index]] * mem.scale
    address &= MASK32 if mem.address32 else MASK64
    if mem.segment in ("fs", "gs"):
        address = (address + cpu.segment_base(mem.segment)) & MASK64
    return address


def _aligned(cpu: Cpu, insn: Instruction, alignment: int) -> int:
    address = effective_address(cpu, insn)
    if address % alignment:
        raise ExecutionError(
            "#GP", f"{insn.mnemonic} needs a {alignment}-byte aligned operand, got {address:#x}"
        )
    return address


def _load(cpu: Cpu, insn: Instruction, size: int, alignment: int = 1) -> int:
    """The r/m source: an XMM register's low ``size`` bytes, or memory."""
    if insn.rm != NO_REGISTER:
        return cpu.vector().xmm(insn.rm) & ((1 << (8 * size)) - 1)
    address = _aligned(cpu, insn, alignment)
    return int.from_bytes(cpu.read(address, size), "little")


def _store(cpu: Cpu, insn: Instruction, value: int, size: int, alignment: int = 1) -> None:
    address = _aligned(cpu, insn, alignment)
    cpu.write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def _gpr(cpu: Cpu, number: int) -> int:
    return cpu.regs[ENCODING_TO_INDEX[number]]


def _set_gpr(cpu: Cpu, number: int, value: int, size: int) -> None:
    # A 32-bit write zero-extends into the full 64-bit register.
    cpu.regs[ENCODING_TO_INDEX[number]] = value & (MASK64 if size == 8 else MASK32)


def _check_sse(cpu: Cpu, insn: Instruction) -> None:
    cr0 = cpu.cr0
    if cr0 & CR0_EM or not cpu.cr4 & CR4_OSFXSR:
        raise ExecutionError("#UD", f"{insn.mnemonic} with SSE not enabled (CR0.EM or CR4.OSFXSR)")
    if cr0 & CR0_TS:
        raise ExecutionError("#NM", f"{insn.mnemonic} with CR0.TS set (lazy FPU switch)")


def _check_xsave(cpu: Cpu, insn: Instruction) -> None:
    if not cpu.cr4 & CR4_OSXSAVE:
        raise ExecutionError("#UD", f"{insn.mnemonic} with CR4.OSXSAVE clear")
    if insn.mnemonic != "xgetbv" and cpu.cr0 & CR0_TS:
        raise ExecutionError("#NM", f"{insn.mnemonic} with CR0.TS set (lazy FPU switch)")


# -- lane arithmetic on 128-bit integers ------------------------------------------


def _repeat(pattern: int, bits: int) -> int:
    value = 0
    for shift in range(0, 128, bits):
        value |= pattern << shift
    return value


def _high_bits(bits: int) -> int:
    return _repeat(1 << (bits - 1), bits)


def _swar_add(bits: int) -> Callable[[int, int], int]:
    high = _high_bits(bits)
    low = MASK128 ^ high

    def add(a: int, b: int) -> int:
        # Add without the lanes' top bits (no carry can cross a lane), then the
        # top bits by xor.
        return ((a & low) + (b & low)) ^ ((a ^ b) & high)

    return add


def _swar_sub(bits: int) -> Callable[[int, int], int]:
    high = _high_bits(bits)
    low = MASK128 ^ high

    def sub(a: int, b: int) -> int:
        # Each lane of (a | high) exceeds (b & low), so no borrow crosses a lane.
        return (((a | high) - (b & low)) ^ ((a ^ ~b) & high)) & MASK128

    return sub


_FORMATS = {
    "b": struct.Struct("<16b"),
    "B": struct.Struct("<16B"),
    "h": struct.Struct("<8h"),
    "H": struct.Struct("<8H"),
    "i": struct.Struct("<4i"),
    "I": struct.Struct("<4I"),
    "q": struct.Struct("<2q"),
    "Q": struct.Struct("<2Q"),
}


def _lanes(value: int, kind: str) -> tuple[int, ...]:
    lanes: tuple[int, ...] = _FORMATS[kind].unpack(value.to_bytes(16, "little"))
    return lanes


def _join(lanes: list[int] | tuple[int, ...], kind: str) -> int:
    return int.from_bytes(_FORMATS[kind].pack(*lanes), "little")


def _lanewise(
    kind: str, fn: Callable[[int, int], int], out: str | None = None
) -> Callable[[int, int], int]:
    out_kind = out or kind
    unpack = _FORMATS[kind].unpack
    pack = _FORMATS[out_kind].pack

    def op(a: int, b: int) -> int:
        xs = unpack(a.to_bytes(16, "little"))
        ys = unpack(b.to_bytes(16, "little"))
        return int.from_bytes(pack(*map(fn, xs, ys)), "little")

    return op


def _saturate(lo: int, hi: int) -> Callable[[int], int]:
    return lambda x: lo if x < lo else hi if x > hi else x


def _pack(kind: str, out: str, lo: int, hi: int) -> Callable[[int, int], int]:
    clamp = _saturate(lo, hi)

    def op(a: int, b: int) -> int:
        return _join([clamp(x) for x in _lanes(a, kind) + _lanes(b, kind)], out)

    return op


def _unpack(kind: str, high: bool) -> Callable[[int, int], int]:
    def op(a: int, b: int) -> int:
        xs, ys = _lanes(a, kind), _lanes(b, kind)
        half = len(xs) // 2
        start = half if high else 0
        out: list[int] = []
        for i in range(start, start + half):
            out += (xs[i], ys[i])
        return _join(out, kind)

    return op


def _madd(a: int, b: int) -> int:
    xs, ys = _lanes(a, "h"), _lanes(b, "h")
    sums = [(xs[i] * ys[i] + xs[i + 1] * ys[i + 1]) & MASK32 for i in range(0, 8, 2)]
    return _join(sums, "I")


def _sad(a: int, b: int) -> int:
    xs, ys = _lanes(a, "B"), _lanes(b, "B")
    low = sum(abs(xs[i] - ys[i]) for i in range(8))
    high = sum(abs(xs[i] - ys[i]) for i in range(8, 16))
    return low | (high << 64)


def _mul_udq(a: int, b: int) -> int:
    return ((a & MASK32) * (b & MASK32)) | (((a >> 64) & MASK32) * ((b >> 64) & MASK32)) << 64


def _shift(kind: str, direction: str) -> Callable[[int, int], int]:
    """Per-lane shift of ``a`` by ``count`` (logical left/right, or arithmetic)."""
    bits = {"H": 16, "I": 32, "Q": 64, "h": 16, "i": 32}[kind]
    mask = (1 << bits) - 1

    def op(a: int, count: int) -> int:
        if direction == "sra":
            count = min(count, bits - 1)
            return _join([(x >> count) & mask for x in _lanes(a, kind)], kind.upper())
        if count >= bits:
            return 0
        if direction == "shl":
            return _join([(x << count) & mask for x in _lanes(a, kind)], kind)
        return _join([x >> count for x in _lanes(a, kind)], kind)

    return op


BINARY: dict[str, Callable[[int, int], int]] = {
    "paddb": _swar_add(8),
    "paddw": _swar_add(16),
    "paddd": _swar_add(32),
    "paddq": _swar_add(64),
    "psubb": _swar_sub(8),
    "psubw": _swar_sub(16),
    "psubd": _swar_sub(32),
    "psubq": _swar_sub(64),
    "paddsb": _lanewise("b", lambda x, y: min(127, max(-128, x + y))),
    "paddsw": _lanewise("h", lambda x, y: min(32767, max(-32768, x + y))),
    "paddusb": _lanewise("B", lambda x, y: min(255, x + y)),
    "paddusw": _lanewise("H", lambda x, y: min(65535, x + y)),
    "psubsb": _lanewise("b", lambda x, y: min(127, max(-128, x - y))),
    "psubsw": _lanewise("h", lambda x, y: min(32767, max(-32768, x - y))),
    "psubusb": _lanewise("B", lambda x, y: max(0, x - y)),
    "psubusw": _lanewise("H", lambda x, y: max(0, x - y)),
    "pmullw": _lanewise("H", lambda x, y: (x * y) & 0xFFFF),
    "pmulhw": _lanewise("h", lambda x, y: ((x * y) >> 16) & 0xFFFF, "H"),
    "pmulhuw": _lanewise("H", lambda x, y: (x * y) >> 16),
    "pmuludq": _mul_udq,
    "pmaddwd": _madd,
    "psadbw": _sad,
    "pavgb": _lanewise("B", lambda x, y: (x + y + 1) >> 1),
    "pavgw": _lanewise("H", lambda x, y: (x + y + 1) >> 1),
    "pminub": _lanewise("B", min),
    "pmaxub": _lanewise("B", max),
    "pminsw": _lanewise("h", min),
    "pmaxsw": _lanewise("h", max),
    "pcmpeqb": _lanewise("B", lambda x, y: 0xFF if x == y else 0),
    "pcmpeqw": _lanewise("H", lambda x, y: 0xFFFF if x == y else 0),
    "pcmpeqd": _lanewise("I", lambda x, y: MASK32 if x == y else 0),
    "pcmpgtb": _lanewise("b", lambda x, y: 0xFF if x > y else 0, "B"),
    "pcmpgtw": _lanewise("h", lambda x, y: 0xFFFF if x > y else 0, "H"),
    "pcmpgtd": _lanewise("i", lambda x, y: MASK32 if x > y else 0, "I"),
    "pand": lambda a, b: a & b,
    "pandn": lambda a, b: ~a & b & MASK128,
    "por": lambda a, b: a | b,
    "pxor": lambda a, b: a ^ b,
    "andps": lambda a, b: a & b,
    "andpd": lambda a, b: a & b,
    "andnps": lambda a, b: ~a & b & MASK128,
    "andnpd": lambda a, b: ~a & b & MASK128,
    "orps": lambda a, b: a | b,
    "orpd": lambda a, b: a | b,
    "xorps": lambda a, b: a ^ b,
    "xorpd": lambda a, b: a ^ b,
    "packsswb": _pack("h", "b", -128, 127),
    "packuswb": _pack("h", "B", 0, 255),
    "packssdw": _pack("i", "h", -32768, 32767),
    "punpcklbw": _unpack("B", False),
    "punpcklwd": _unpack("H", False),
    "punpckldq": _unpack("I", False),
    "punpcklqdq": _unpack("Q", False),
    "punpckhbw": _unpack("B", True),
    "punpckhwd": _unpack("H", True),
    "punpckhdq": _unpack("I", True),
    "punpckhqdq": _unpack("Q", True),
    "unpcklps": _unpack("I", False),
    "unpckhps": _unpack("I", True),
    "unpcklpd": _unpack("Q", False),
    "unpckhpd": _unpack("Q", True),
}

SHIFTS: dict[str, Callable[[int, int], int]] = {
    "psrlw": _shift("H", "shr"),
    "psrld": _shift("I", "shr"),
    "psrlq": _shift("Q", "shr"),
    "psllw": _shift("H", "shl"),
    "pslld": _shift("I", "shl"),
    "psllq": _shift("Q", "shl"),
    "psraw": _shift("h", "sra"),
    "psrad": _shift("i", "sra"),
}


def _binary_handler(fn: Callable[[int, int], int]) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        source = _load(cpu, insn, 16, 16)
        vec = cpu.vector()
        vec.set_xmm(insn.reg, fn(vec.xmm(insn.reg), source))

    return run


def _shift_handler(fn: Callable[[int, int], int]) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        count = _load(cpu, insn, 16, 16) & MASK64
        vec = cpu.vector()
        vec.set_xmm(insn.reg, fn(vec.xmm(insn.reg), count))

    return run


def _shift_imm_handler(fn: Callable[[int, int], int]) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        vec = cpu.vector()
        vec.set_xmm(insn.rm, fn(vec.xmm(insn.rm), insn.immediate))

    return run


def _byte_shift(left: bool) -> Callable[[int, int], int]:
    def op(a: int, count: int) -> int:
        if count > 15:
            return 0
        return (a << (8 * count)) & MASK128 if left else a >> (8 * count)

    return op


# -- moves ---------------------------------------------------------------------


def _move_load(size: int, alignment: int, keep_upper_from_register: bool = False) -> Handler:
    """Load ``size`` bytes into xmm[reg]; memory loads zero the rest, register
    sources of movss/movsd merge into the low part only."""
    mask = (1 << (8 * size)) - 1

    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        value = _load(cpu, insn, size, alignment)
        vec = cpu.vector()
        if keep_upper_from_register and insn.rm != NO_REGISTER:
            value |= vec.xmm(insn.reg) & ~mask & MASK128
        vec.set_xmm(insn.reg, value)

    return run


def _move_store(size: int, alignment: int, zero_upper_register: bool = False) -> Handler:
    """Store xmm[reg]'s low ``size`` bytes to r/m (register r/m: merge or zero-extend)."""
    mask = (1 << (8 * size)) - 1

    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        vec = cpu.vector()
        value = vec.xmm(insn.reg) & mask
        if insn.rm == NO_REGISTER:
            _store(cpu, insn, value, size, alignment)
        elif zero_upper_register or size == 16:
            vec.set_xmm(insn.rm, value)
        else:
            vec.set_xmm(insn.rm, (vec.xmm(insn.rm) & ~mask & MASK128) | value)

    return run


def _move_half(high: bool, store: bool) -> Handler:
    """movlps/movlpd/movhps/movhpd: one 64-bit half between memory and xmm[reg]."""
    shift = 64 if high else 0

    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        vec = cpu.vector()
        if store:
            _store(cpu, insn, vec.xmm(insn.reg) >> shift, 8)
            return
        half = int.from_bytes(cpu.read(effective_address(cpu, insn), 8), "little")
        keep = vec.xmm(insn.reg) & (MASK64 if high else MASK64 << 64)
        vec.set_xmm(insn.reg, keep | (half << shift))

    return run


def _movhlps(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    vec = cpu.vector()
    vec.set_xmm(insn.reg, (vec.xmm(insn.reg) & (MASK64 << 64)) | (vec.xmm(insn.rm) >> 64))


def _movlhps(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    vec = cpu.vector()
    vec.set_xmm(insn.reg, (vec.xmm(insn.reg) & MASK64) | ((vec.xmm(insn.rm) & MASK64) << 64))


def _movd_load(cpu: Cpu, insn: Instruction) -> None:
    """66 0F 6E: movd xmm, r/m32 and movq xmm, r/m64 (REX.W): zero-extended."""
    _check_sse(cpu, insn)
    size = 8 if insn.rex_w else 4
    if insn.rm != NO_REGISTER:
        value = _gpr(cpu, insn.rm) & ((1 << (8 * size)) - 1)
    else:
        value = int.from_bytes(cpu.read(effective_address(cpu, insn), size), "little")
    cpu.vector().set_xmm(insn.reg, value)


def _movd_store(cpu: Cpu, insn: Instruction) -> None:
    """66 0F 7E: movd r/m32, xmm and movq r/m64, xmm (REX.W)."""
    _check_sse(cpu, insn)
    size = 8 if insn.rex_w else 4
    value = cpu.vector().xmm(insn.reg) & ((1 << (8 * size)) - 1)
    if insn.rm != NO_REGISTER:
        _set_gpr(cpu, insn.rm, value, size)
    else:
        _store(cpu, insn, value, size)


def _pmovmskb(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    value = cpu.vector().xmm(insn.rm)
    mask = 0
    for i in range(16):
        mask |= ((value >> (8 * i + 7)) & 1) << i
    _set_gpr(cpu, insn.reg, mask, 8)


def _shuffle_dwords(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    lanes = _lanes(_load(cpu, insn, 16, 16), "I")
    imm = insn.immediate
    cpu.vector().set_xmm(insn.reg, _join([lanes[(imm >> (2 * i)) & 3] for i in range(4)], "I"))


def _shuffle_words(high: bool) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        _check_sse(cpu, insn)
        words = _lanes(_load(cpu, insn, 16, 16), "H")
        imm = insn.immediate
        base = 4 if high else 0
        picked = [words[base + ((imm >> (2 * i)) & 3)] for i in range(4)]
        out = list(words[:4]) + picked if high else picked + list(words[4:])
        cpu.vector().set_xmm(insn.reg, _join(out, "H"))

    return run


def _shufps(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    source = _lanes(_load(cpu, insn, 16, 16), "I")
    vec = cpu.vector()
    dest = _lanes(vec.xmm(insn.reg), "I")
    imm = insn.immediate
    out = [dest[imm & 3], dest[(imm >> 2) & 3], source[(imm >> 4) & 3], source[(imm >> 6) & 3]]
    vec.set_xmm(insn.reg, _join(out, "I"))


def _shufpd(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    source = _lanes(_load(cpu, insn, 16, 16), "Q")
    vec = cpu.vector()
    dest = _lanes(vec.xmm(insn.reg), "Q")
    imm = insn.immediate
    vec.set_xmm(insn.reg, _join([dest[imm & 1], source[(imm >> 1) & 1]], "Q"))


def _movnti(cpu: Cpu, insn: Instruction) -> None:
    size = 8 if insn.rex_w else 4
    _store(cpu, insn, _gpr(cpu, insn.reg), size)


def _no_operation(cpu: Cpu, insn: Instruction) -> None:
    """Fences and prefetch hints: the vCPU is stopped, so memory is already ordered."""


def _clflush(cpu: Cpu, insn: Instruction) -> None:
    cpu.read(effective_address(cpu, insn), 1)  # faults as the access would; no cache here


def _cmpxchg16b(cpu: Cpu, insn: Instruction) -> None:
    """cmpxchg16b m128 (REX.W) / cmpxchg8b m64: the vCPU is stopped while this runs,
    and the VMM holds every other vCPU of the VM outside the guest while it runs a
    locked instruction, so the read-compare-write is atomic for the guest."""
    regs = cpu.regs
    if insn.rex_w:
        size, mask = 16, MASK64
        address = _aligned(cpu, insn, 16)
    else:
        size, mask = 8, MASK32
        address = effective_address(cpu, insn)
    half = 8 * (size // 2)
    current = int.from_bytes(cpu.read(address, size), "little")
    expected = (regs[RAX] & mask) | ((regs[RDX] & mask) << half)
    if current == expected:
        cpu.write(
            address, ((regs[RBX] & mask) | ((regs[RCX] & mask) << half)).to_bytes(size, "little")
        )
        regs[RFLAGS] |= FLAG_ZF
    else:
        regs[RAX] = current & mask
        regs[RDX] = (current >> half) & mask
        regs[RFLAGS] &= ~FLAG_ZF & MASK64


def _random_number(cpu: Cpu, insn: Instruction) -> None:
    """rdrand / rdseed r16/r32/r64 from the kernel's random source (getrandom).

    The kernel's pool never runs dry, so the instruction always succeeds: CF = 1
    and OF, SF, ZF, AF, PF cleared, as the SDM defines a successful return."""
    size = 8 if insn.rex_w else 2 if insn.operand16 else 4
    value = int.from_bytes(os.urandom(size), "little")
    regs = cpu.regs
    if size == 2:  # a 16-bit write keeps the register's upper bits
        index = ENCODING_TO_INDEX[insn.rm]
        regs[index] = (regs[index] & ~0xFFFF & MASK64) | value
    else:
        _set_gpr(cpu, insn.rm, value, size)
    cleared = FLAG_OF | FLAG_SF | FLAG_ZF | FLAG_AF | FLAG_PF
    regs[RFLAGS] = (regs[RFLAGS] & ~cleared & MASK64) | FLAG_CF


def _bit_count(kind: str) -> Handler:
    """popcnt, tzcnt, lzcnt r, r/m (16, 32 or 64 bits).

    popcnt clears OF SF AF CF PF and sets ZF for a zero source; tzcnt and lzcnt
    set CF for a zero source (the result is then the operand width) and ZF for a
    zero result, and leave OF SF AF PF undefined: here OF is kept and the others
    cleared, as this project's (AMD) hosts do (checked natively by the tests)."""

    def handler(cpu: Cpu, insn: Instruction) -> None:
        size = 8 if insn.rex_w else 2 if insn.operand16 else 4
        bits = 8 * size
        mask = (1 << bits) - 1
        if insn.rm != NO_REGISTER:
            source = _gpr(cpu, insn.rm) & mask
        else:
            source = int.from_bytes(cpu.read(effective_address(cpu, insn), size), "little")
        flags = 0
        cleared = FLAG_ZF | FLAG_CF | FLAG_SF | FLAG_AF | FLAG_PF
        if kind == "popcnt":
            result = source.bit_count()
            flags = FLAG_ZF if source == 0 else 0
            cleared |= FLAG_OF
        else:
            if kind == "tzcnt":
                result = bits if source == 0 else (source & -source).bit_length() - 1
            else:
                result = bits - source.bit_length()
            flags = (FLAG_CF if source == 0 else 0) | (FLAG_ZF if result == 0 else 0)
        regs = cpu.regs
        if size == 2:  # a 16-bit write keeps the register's upper bits
            index = ENCODING_TO_INDEX[insn.reg]
            regs[index] = (regs[index] & ~0xFFFF & MASK64) | result
        else:
            _set_gpr(cpu, insn.reg, result, size)
        regs[RFLAGS] = (regs[RFLAGS] & ~cleared & MASK64) | flags

    return handler


FSW_ES = 1 << 7  # x87 status: an unmasked exception is pending


def _fwait(cpu: Cpu, insn: Instruction) -> None:
    """fwait: nothing, unless it must fault (#NM with CR0.TS and CR0.MP, #MF with an
    unmasked x87 exception pending); those are not delivered here."""
    cr0 = cpu.cr0
    if cr0 & CR0_TS and cr0 & CR0_MP:
        raise ExecutionError("#NM", "fwait with CR0.TS and CR0.MP set (lazy FPU switch)")
    fsw = int.from_bytes(cpu.vector().area[FSW : FSW + 2], "little")
    if fsw & FSW_ES:
        raise ExecutionError("#MF", "fwait with an unmasked x87 exception pending")


def _fninit(cpu: Cpu, insn: Instruction) -> None:
    """fninit: the x87 unit's initial state (FCW 0x37f, status, tags and pointers
    cleared); MXCSR and the XMM registers are not x87 state and stay.  The eight
    physical registers keep their values, but TOP becomes 0, so the area, which
    holds them in stack order ST(i) = R((TOP + i) mod 8), is rotated."""
    cr0 = cpu.cr0
    if cr0 & CR0_EM:
        raise ExecutionError("#NM", "fninit with CR0.EM set")
    if cr0 & CR0_TS:
        raise ExecutionError("#NM", "fninit with CR0.TS set (lazy FPU switch)")
    vec = cpu.vector()
    area = vec.area
    top = (int.from_bytes(area[FSW : FSW + 2], "little") >> 11) & 7
    stack = [bytes(area[ST0 + 16 * i : ST0 + 16 * i + 16]) for i in range(8)]
    area[ST0:XMM0] = b"".join(stack[(i - top) % 8] for i in range(8))
    area[0:MXCSR] = FCW_RESET.to_bytes(2, "little") + bytes(MXCSR - 2)
    vec.changed |= X87_COMPONENT
    vec.in_use |= X87_COMPONENT


def _access_check(set_it: bool) -> Handler:
    """clac / stac: clear or set RFLAGS.AC, which lets kernel code touch user pages
    under SMAP.  Only kernel code reaches the fallback (user code runs natively,
    where these raise #UD at CPL 3)."""

    def handler(cpu: Cpu, insn: Instruction) -> None:
        regs = cpu.regs
        regs[RFLAGS] = regs[RFLAGS] | FLAG_AC if set_it else regs[RFLAGS] & ~FLAG_AC & MASK64

    return handler


# -- MXCSR, XCR0 and the state-save instructions ---------------------------------------


def _ldmxcsr(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    value = int.from_bytes(cpu.read(effective_address(cpu, insn), 4), "little")
    vec = cpu.vector()
    if value & ~vec.mxcsr_mask:
        raise ExecutionError("#GP", f"ldmxcsr of {value:#x} sets reserved MXCSR bits")
    vec.set_mxcsr(value)


def _stmxcsr(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    _store(cpu, insn, cpu.vector().mxcsr, 4)


def _xgetbv(cpu: Cpu, insn: Instruction) -> None:
    _check_xsave(cpu, insn)
    regs = cpu.regs
    index = regs[RCX] & MASK32
    if index == 0:
        value = cpu.xcr0()
    elif index == 1:
        # XINUSE: components not in their initial configuration (XSTATE_BV is
        # what the vCPU's saved state says; a set bit is always a valid answer).
        value = cpu.xcr0() & cpu.vector().in_use
    else:
        raise ExecutionError("#GP", f"xgetbv of XCR{index}, which does not exist")
    regs[RAX] = value & MASK32
    regs[RDX] = value >> 32


def _x87_image(area: bytearray, wide: bool) -> bytes:
    """Bytes 0-23 of an FXSAVE image: FCW, FSW, abridged FTW, FOP, FIP, FDP.

    Without REX.W the instruction pointers are 32 bits with selectors after them
    (stored as 0: the VMM does not know them, and 64-bit code has no use for them).
    """
    head = bytes(area[0:8])
    if wide:
        return head + bytes(area[FIP:MXCSR])
    fip = bytes(area[FIP : FIP + 4]) + bytes(4)
    fdp = bytes(area[FDP : FDP + 4]) + bytes(4)
    return head + fip + fdp


def _fxsave(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    address = _aligned(cpu, insn, 16)
    area = cpu.vector().area
    image = _x87_image(area, insn.rex_w) + bytes(area[MXCSR:LEGACY_END])
    cpu.write(address, image)


def _restore_x87(area: bytearray, image: bytes, wide: bool) -> None:
    area[0:8] = image[0:8]
    if wide:
        area[FIP:MXCSR] = image[FIP:MXCSR]
    else:
        area[FIP:MXCSR] = image[FIP : FIP + 4] + bytes(4) + image[FDP : FDP + 4] + bytes(4)
    area[ST0:XMM0] = image[ST0:XMM0]


def _fxrstor(cpu: Cpu, insn: Instruction) -> None:
    _check_sse(cpu, insn)
    address = _aligned(cpu, insn, 16)
    image = cpu.read(address, LEGACY_END)
    vec = cpu.vector()
    mxcsr = int.from_bytes(image[MXCSR : MXCSR + 4], "little")
    if mxcsr & ~vec.mxcsr_mask:
        raise ExecutionError("#GP", f"fxrstor of MXCSR {mxcsr:#x} sets reserved bits")
    area = vec.area
    _restore_x87(area, image, insn.rex_w)
    area[MXCSR : MXCSR + 4] = image[MXCSR : MXCSR + 4]
    area[XMM0:LEGACY_END] = image[XMM0:LEGACY_END]
    vec.changed |= X87_COMPONENT | SSE_COMPONENT
    vec.in_use |= X87_COMPONENT | SSE_COMPONENT


def _requested(cpu: Cpu, insn: Instruction, vec: VectorState) -> int:
    """RFBM: the components both enabled in XCR0 and asked for in EDX:EAX."""
    regs = cpu.regs
    rfbm = cpu.xcr0() & (((regs[RDX] & MASK32) << 32) | (regs[RAX] & MASK32))
    if rfbm & ~vec.components:
        raise ExecutionError(
            "-",
            f"{insn.mnemonic} of XSAVE components {rfbm:#x}: "
            f"only {vec.components:#x} have a known layout",
        )
    return rfbm


def _extended(vec: VectorState, rfbm: int) -> list[tuple[int, int, int]]:
    """(bit, offset, end) of each requested component after SSE."""
    return [
        (1 << bit, offset, offset + size)
        for bit, (offset, size) in sorted(vec.layout.items())
        if rfbm & (1 << bit)
    ]


def _xsave(cpu: Cpu, insn: Instruction) -> None:
    """xsave and xsaveopt (standard format).

    XSAVEOPT skips components in their initial configuration (XINUSE clear: the
    "init optimization") and may skip unmodified ones; it is emulated with the
    first and without the second, which the SDM allows and XRSTOR cannot tell
    apart.  MXCSR is saved whenever SSE or AVX is requested, as by XSAVE.
    """
    _check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = _aligned(cpu, insn, 64)
    area = vec.area
    in_use = vec.in_use
    written = rfbm & in_use if insn.mnemonic == "xsaveopt" else rfbm
    extended = _extended(vec, written)
    end = max([HEADER_END, *(stop for _, _, stop in extended)])
    # XSAVE writes only what RFBM covers; build the image over the current bytes.
    image = bytearray(cpu.read(address, end))
    if written & X87_COMPONENT:
        image[0:MXCSR] = _x87_image(area, insn.rex_w)
        image[ST0:XMM0] = area[ST0:XMM0]
    if rfbm & (SSE_COMPONENT | AVX_COMPONENT):
        image[MXCSR:ST0] = area[MXCSR:ST0]
    if written & SSE_COMPONENT:
        image[XMM0:LEGACY_END] = area[XMM0:LEGACY_END]
    for _, start, stop in extended:
        image[start:stop] = area[start:stop]
    header = int.from_bytes(image[XSTATE_BV : XSTATE_BV + 8], "little")
    header = (header & ~rfbm) | (in_use & rfbm)
    image[XSTATE_BV : XSTATE_BV + 8] = header.to_bytes(8, "little")
    cpu.write(address, bytes(image))


def _xsavec(cpu: Cpu, insn: Instruction) -> None:
    """xsavec: the compacted format with the init optimization (SDM vol. 1, 13.10).

    Component i is written only if requested and in use, at the place the
    compacted format gives it among all requested ones; XSTATE_BV says which
    were written and XCOMP_BV (bit 63 set) which were requested.  Only those two
    header fields are written.  SSE counts as in use when MXCSR is not at its
    reset value, as the CPU's XINUSE tracks it, so MXCSR is never lost.
    """
    _check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = _aligned(cpu, insn, 64)
    area = vec.area
    in_use = vec.in_use | (SSE_COMPONENT if vec.mxcsr != MXCSR_RESET else 0)
    written = rfbm & in_use
    placed = vec.compacted(rfbm)
    end = max([HEADER_END, *(offset + size for _, offset, _, size in placed)])
    image = bytearray(cpu.read(address, end))
    if written & X87_COMPONENT:
        image[0:MXCSR] = _x87_image(area, insn.rex_w)
        image[ST0:XMM0] = area[ST0:XMM0]
    if rfbm & SSE_COMPONENT:
        image[MXCSR:ST0] = area[MXCSR:ST0]
    if written & SSE_COMPONENT:
        image[XMM0:LEGACY_END] = area[XMM0:LEGACY_END]
    for bit, offset, standard, size in placed:
        if written & bit:
            image[offset : offset + size] = area[standard : standard + size]
    image[XSTATE_BV:HEADER_END] = (
        written.to_bytes(8, "little")
        + (rfbm | COMPACTED_FORMAT).to_bytes(8, "little")
        + image[XCOMP_BV + 8 : HEADER_END]
    )
    cpu.write(address, bytes(image))


def _xrstor(cpu: Cpu, insn: Instruction) -> None:
    """xrstor: load what XSTATE_BV marks, initialise the rest of RFBM.

    The area's XCOMP_BV bit 63 chooses the standard or the compacted form (SDM
    vol. 1, 13.8), which differ in where extended components lie and in MXCSR:
    the standard form loads it whenever SSE or AVX is requested, the compacted
    form only with SSE's state, and resets it when SSE is initialised.
    """
    _check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = _aligned(cpu, insn, 64)
    header = cpu.read(address + XSTATE_BV, 64)
    xstate_bv = int.from_bytes(header[0:8], "little")
    xcomp_bv = int.from_bytes(header[8:16], "little")
    compacted = bool(xcomp_bv & COMPACTED_FORMAT)
    xcr0 = cpu.xcr0()
    if compacted:
        held = xcomp_bv & ~COMPACTED_FORMAT
        if held & ~xcr0 or xstate_bv & ~held or any(header[16:]):
            raise ExecutionError("#GP", "xrstor of a compacted area with an invalid XSAVE header")
        extended = [
            (bit, offset, standard, size)
            for bit, offset, standard, size in vec.compacted(held)
            if rfbm & bit
        ]
        # Requested components the area does not hold (offset -1) are initialised.
        extended += [
            (bit, -1, start, stop - start) for bit, start, stop in _extended(vec, rfbm & ~held)
        ]
    else:
        if xstate_bv & ~xcr0 or any(header[8:]):
            raise ExecutionError("#GP", "xrstor of an area with an invalid XSAVE header")
        extended = [(bit, start, start, stop - start) for bit, start, stop in _extended(vec, rfbm)]
    end = max([LEGACY_END, *(offset + size for _, offset, _, size in extended if offset >= 0)])
    image = cpu.read(address, end)
    loaded = rfbm & xstate_bv
    if compacted:
        load_mxcsr = bool(rfbm & SSE_COMPONENT)
        mxcsr_bytes = (
            image[MXCSR : MXCSR + 4]
            if loaded & SSE_COMPONENT
            else MXCSR_RESET.to_bytes(4, "little")
        )
    else:
        load_mxcsr = bool(rfbm & (SSE_COMPONENT | AVX_COMPONENT))
        mxcsr_bytes = image[MXCSR : MXCSR + 4]
    mxcsr = int.from_bytes(mxcsr_bytes, "little")
    if load_mxcsr and mxcsr & ~vec.mxcsr_mask:
        raise ExecutionError("#GP", f"xrstor of MXCSR {mxcsr:#x} sets reserved bits")
    area = vec.area
    if rfbm & X87_COMPONENT:
        if loaded & X87_COMPONENT:
            _restore_x87(area, image, insn.rex_w)
        else:
            area[0:MXCSR] = FCW_RESET.to_bytes(2, "little") + bytes(MXCSR - 2)
            area[ST0:XMM0] = bytes(XMM0 - ST0)
    if load_mxcsr:
        area[MXCSR : MXCSR + 4] = mxcsr_bytes
    if rfbm & SSE_COMPONENT:
        area[XMM0:LEGACY_END] = (
            image[XMM0:LEGACY_END] if loaded & SSE_COMPONENT else bytes(LEGACY_END - XMM0)
        )
    for bit, offset, standard, size in extended:
        # Every extended user component initialises to zeros.
        area[standard : standard + size] = (
            image[offset : offset + size] if loaded & bit else bytes(size)
        )
    vec.in_use = (vec.in_use & ~rfbm) | loaded
    vec.changed |= rfbm | (SSE_COMPONENT if load_mxcsr else 0)


HANDLERS: dict[str, Handler] = {
    **{name: _binary_handler(fn) for name, fn in BINARY.items()},
    **{name: _shift_handler(fn) for name, fn in SHIFTS.items()},
    **{name + ".imm": _shift_imm_handler(fn) for name, fn in SHIFTS.items()},
    "psrldq.imm": _shift_imm_handler(_byte_shift(left=False)),
    "pslldq.imm": _shift_imm_handler(_byte_shift(left=True)),
    "movups": _move_load(16, 1),
    "movupd": _move_load(16, 1),
    "movdqu": _move_load(16, 1),
    "lddqu": _move_load(16, 1),
    "movaps": _move_load(16, 16),
    "movapd": _move_load(16, 16),
    "movdqa": _move_load(16, 16),
    "movss": _move_load(4, 1, keep_upper_from_register=True),
    "movsd": _move_load(8, 1, keep_upper_from_register=True),
    "movq": _move_load(8, 1),
    "movups.store": _move_store(16, 1),
    "movupd.store": _move_store(16, 1),
    "movdqu.store": _move_store(16, 1),
    "movaps.store": _move_store(16, 16),
    "movapd.store": _move_store(16, 16),
    "movdqa.store": _move_store(16, 16),
    "movntps": _move_store(16, 16),
    "movntpd": _move_store(16, 16),
    "movntdq": _move_store(16, 16),
    "movss.store": _move_store(4, 1),
    "movsd.store": _move_store(8, 1),
    "movq.store": _move_store(8, 1, zero_upper_register=True),
    "movlps": _move_half(high=False, store=False),
    "movlpd": _move_half(high=False, store=False),
    "movhps": _move_half(high=True, store=False),
    "movhpd": _move_half(high=True, store=False),
    "movlps.store": _move_half(high=False, store=True),
    "movlpd.store": _move_half(high=False, store=True),
    "movhps.store": _move_half(high=True, store=True),
    "movhpd.store": _move_half(high=True, store=True),
    "movhlps": _movhlps,
    "movlhps": _movlhps,
    "movd": _movd_load,
    "movd.store": _movd_store,
    "pmovmskb": _pmovmskb,
    "pshufd": _shuffle_dwords,
    "pshuflw": _shuffle_words(high=False),
    "pshufhw": _shuffle_words(high=True),
    "shufps": _shufps,
    "shufpd": _shufpd,
    "movnti": _movnti,
    "lfence": _no_operation,
    "mfence": _no_operation,
    "sfence": _no_operation,
    "prefetchnta": _no_operation,
    "prefetcht0": _no_operation,
    "prefetcht1": _no_operation,
    "prefetcht2": _no_operation,
    "prefetchw": _no_operation,
    "clflush": _clflush,
    "cmpxchg16b": _cmpxchg16b,
    "rdrand": _random_number,
    "rdseed": _random_number,
    "ldmxcsr": _ldmxcsr,
    "stmxcsr": _stmxcsr,
    "xgetbv": _xgetbv,
    "fxsave": _fxsave,
    "fxrstor": _fxrstor,
    "xsave": _xsave,
    "xsaveopt": _xsave,
    "xrstor": _xrstor,
    "xsavec": _xsavec,
    "fwait": _fwait,
    "fninit": _fninit,
    "popcnt": _bit_count("popcnt"),
    "tzcnt": _bit_count("tzcnt"),
    "lzcnt": _bit_count("lzcnt"),
    "clac": _access_check(set_it=False),
    "stac": _access_check(set_it=True),
}


def display_name(insn: Instruction) -> str:
    """The mnemonic as a disassembler prints it (``movq`` for REX.W ``movd``, ...)."""
    name = insn.mnemonic.removesuffix(".store").removesuffix(".imm")
    if insn.rex_w:
        if name == "movd":
            return "movq"
        if name in ("fxsave", "fxrstor", "xsave", "xsaveopt", "xrstor", "xsavec"):
            return name + "64"
    elif name == "cmpxchg16b":
        return "cmpxchg8b"
    return name


def handler_for(insn: Instruction) -> Handler:
    return HANDLERS[insn.mnemonic]


def execute(cpu: Cpu, insn: Instruction, handler: Handler | None = None) -> None:
    """Perform ``insn`` on ``cpu`` and move RIP past it."""
    (handler or HANDLERS[insn.mnemonic])(cpu, insn)
    regs = cpu.regs
    regs[RIP] = (regs[RIP] + insn.length) & MASK64


class PlainCpu:
    """A :class:`Cpu` made of plain values: registers in a list, memory a
    ``bytearray`` that starts at linear address ``memory_base``.  What the tests
    and benchmarks drive the emulator with, no KVM involved."""

    def __init__(
        self,
        regs: list[int] | None = None,
        memory: bytearray | None = None,
        memory_base: int = 0,
        vector: VectorState | None = None,
        cr0: int = 0x80000033,
        cr4: int = CR4_OSFXSR | CR4_OSXSAVE,
        xcr0: int = X87_COMPONENT | SSE_COMPONENT,
        fs_base: int = 0,
        gs_base: int = 0,
    ) -> None:
        self._regs = regs if regs is not None else [0] * REGISTER_COUNT
        self.memory = memory if memory is not None else bytearray()
        self.memory_base = memory_base
        self.vector_state = vector if vector is not None else VectorState.reset()
        self._cr0 = cr0
        self._cr4 = cr4
        self._xcr0 = xcr0
        self._bases = {"fs": fs_base, "gs": gs_base}

    @property
    def regs(self) -> list[int]:
        return self._regs

    @property
    def cr0(self) -> int:
        return self._cr0

    @property
    def cr4(self) -> int:
        return self._cr4

    def segment_base(self, segment: str) -> int:
        return self._bases.get(segment, 0)

    def _offset(self, address: int, size: int) -> int:
        offset = address - self.memory_base
        if offset < 0 or offset + size > len(self.memory):
            raise ExecutionError("#PF", f"{size} bytes at {address:#x} are outside memory")
        return offset

    def read(self, address: int, size: int) -> bytes:
        offset = self._offset(address, size)
        return bytes(self.memory[offset : offset + size])

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.memory[offset : offset + len(data)] = data

    def vector(self) -> VectorState:
        return self.vector_state

    def xcr0(self) -> int:
        return self._xcr0
