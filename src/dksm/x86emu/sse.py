"""SSE integer, shuffle and move instructions on XMM registers.

Lane arithmetic is done on 128-bit Python integers (one lane layout per
:mod:`struct` format); each mnemonic maps to a handler in :data:`HANDLERS`.
Facts from the Intel SDM volume 2 (each instruction's operation section); no code
from elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dksm.x86emu.decode import Instruction
from dksm.x86emu.opcodes import NO_REGISTER
from dksm.x86emu.operands import (
    check_sse,
    effective_address,
    load_operand,
    read_gpr,
    store_operand,
    write_gpr,
)
from dksm.x86emu.registers import MASK32, MASK64, MASK128

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.x86emu.cpu import Cpu, Handler


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
        check_sse(cpu, insn)
        source = load_operand(cpu, insn, 16, 16)
        vec = cpu.vector()
        vec.set_xmm(insn.reg, fn(vec.xmm(insn.reg), source))

    return run


def _shift_handler(fn: Callable[[int, int], int]) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        check_sse(cpu, insn)
        count = load_operand(cpu, insn, 16, 16) & MASK64
        vec = cpu.vector()
        vec.set_xmm(insn.reg, fn(vec.xmm(insn.reg), count))

    return run


def _shift_imm_handler(fn: Callable[[int, int], int]) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        check_sse(cpu, insn)
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
        check_sse(cpu, insn)
        value = load_operand(cpu, insn, size, alignment)
        vec = cpu.vector()
        if keep_upper_from_register and insn.rm != NO_REGISTER:
            value |= vec.xmm(insn.reg) & ~mask & MASK128
        vec.set_xmm(insn.reg, value)

    return run


def _move_store(size: int, alignment: int, zero_upper_register: bool = False) -> Handler:
    """Store xmm[reg]'s low ``size`` bytes to r/m (register r/m: merge or zero-extend)."""
    mask = (1 << (8 * size)) - 1

    def run(cpu: Cpu, insn: Instruction) -> None:
        check_sse(cpu, insn)
        vec = cpu.vector()
        value = vec.xmm(insn.reg) & mask
        if insn.rm == NO_REGISTER:
            store_operand(cpu, insn, value, size, alignment)
        elif zero_upper_register or size == 16:
            vec.set_xmm(insn.rm, value)
        else:
            vec.set_xmm(insn.rm, (vec.xmm(insn.rm) & ~mask & MASK128) | value)

    return run


def _move_half(high: bool, store: bool) -> Handler:
    """movlps/movlpd/movhps/movhpd: one 64-bit half between memory and xmm[reg]."""
    shift = 64 if high else 0

    def run(cpu: Cpu, insn: Instruction) -> None:
        check_sse(cpu, insn)
        vec = cpu.vector()
        if store:
            store_operand(cpu, insn, vec.xmm(insn.reg) >> shift, 8)
            return
        half = int.from_bytes(cpu.read(effective_address(cpu, insn), 8), "little")
        keep = vec.xmm(insn.reg) & (MASK64 if high else MASK64 << 64)
        vec.set_xmm(insn.reg, keep | (half << shift))

    return run


def _movhlps(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    vec = cpu.vector()
    vec.set_xmm(insn.reg, (vec.xmm(insn.reg) & (MASK64 << 64)) | (vec.xmm(insn.rm) >> 64))


def _movlhps(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    vec = cpu.vector()
    vec.set_xmm(insn.reg, (vec.xmm(insn.reg) & MASK64) | ((vec.xmm(insn.rm) & MASK64) << 64))


def _movd_load(cpu: Cpu, insn: Instruction) -> None:
    """66 0F 6E: movd xmm, r/m32 and movq xmm, r/m64 (REX.W): zero-extended."""
    check_sse(cpu, insn)
    size = 8 if insn.rex_w else 4
    if insn.rm != NO_REGISTER:
        value = read_gpr(cpu, insn.rm) & ((1 << (8 * size)) - 1)
    else:
        value = int.from_bytes(cpu.read(effective_address(cpu, insn), size), "little")
    cpu.vector().set_xmm(insn.reg, value)


def _movd_store(cpu: Cpu, insn: Instruction) -> None:
    """66 0F 7E: movd r/m32, xmm and movq r/m64, xmm (REX.W)."""
    check_sse(cpu, insn)
    size = 8 if insn.rex_w else 4
    value = cpu.vector().xmm(insn.reg) & ((1 << (8 * size)) - 1)
    if insn.rm != NO_REGISTER:
        write_gpr(cpu, insn.rm, value, size)
    else:
        store_operand(cpu, insn, value, size)


def _pmovmskb(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    value = cpu.vector().xmm(insn.rm)
    mask = 0
    for i in range(16):
        mask |= ((value >> (8 * i + 7)) & 1) << i
    write_gpr(cpu, insn.reg, mask, 8)


def _shuffle_dwords(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    lanes = _lanes(load_operand(cpu, insn, 16, 16), "I")
    imm = insn.immediate
    cpu.vector().set_xmm(insn.reg, _join([lanes[(imm >> (2 * i)) & 3] for i in range(4)], "I"))


def _shuffle_words(high: bool) -> Handler:
    def run(cpu: Cpu, insn: Instruction) -> None:
        check_sse(cpu, insn)
        words = _lanes(load_operand(cpu, insn, 16, 16), "H")
        imm = insn.immediate
        base = 4 if high else 0
        picked = [words[base + ((imm >> (2 * i)) & 3)] for i in range(4)]
        out = list(words[:4]) + picked if high else picked + list(words[4:])
        cpu.vector().set_xmm(insn.reg, _join(out, "H"))

    return run


def _shufps(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    source = _lanes(load_operand(cpu, insn, 16, 16), "I")
    vec = cpu.vector()
    dest = _lanes(vec.xmm(insn.reg), "I")
    imm = insn.immediate
    out = [dest[imm & 3], dest[(imm >> 2) & 3], source[(imm >> 4) & 3], source[(imm >> 6) & 3]]
    vec.set_xmm(insn.reg, _join(out, "I"))


def _shufpd(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    source = _lanes(load_operand(cpu, insn, 16, 16), "Q")
    vec = cpu.vector()
    dest = _lanes(vec.xmm(insn.reg), "Q")
    imm = insn.immediate
    vec.set_xmm(insn.reg, _join([dest[imm & 1], source[(imm >> 1) & 1]], "Q"))


def _movnti(cpu: Cpu, insn: Instruction) -> None:
    size = 8 if insn.rex_w else 4
    store_operand(cpu, insn, read_gpr(cpu, insn.reg), size)


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
}
