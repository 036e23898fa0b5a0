"""General-purpose, x87-control and system instructions: fences and prefetches,
``clflush``, ``cmpxchg16b``, ``rdrand``/``rdseed``, bit counts, ``fwait``/``fninit``
and ``clac``/``stac``.

Facts from the Intel SDM volume 2 (each instruction's operation section); no code
from elsewhere.
"""

from __future__ import annotations

import os

from dksm.x86emu.cpu import FCW_RESET, FSW, MXCSR, ST0, X87_COMPONENT, XMM0, ExecutionError
from dksm.x86emu.decode import Instruction
from dksm.x86emu.opcodes import NO_REGISTER
from dksm.x86emu.operands import aligned_address, effective_address, read_gpr, write_gpr
from dksm.x86emu.registers import (
    CR0_EM,
    CR0_MP,
    CR0_TS,
    ENCODING_TO_INDEX,
    FLAG_AC,
    FLAG_AF,
    FLAG_CF,
    FLAG_OF,
    FLAG_PF,
    FLAG_SF,
    FLAG_ZF,
    MASK32,
    MASK64,
    RAX,
    RBX,
    RCX,
    RDX,
    RFLAGS,
)

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.x86emu.cpu import Cpu, Handler


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
        address = aligned_address(cpu, insn, 16)
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
        write_gpr(cpu, insn.rm, value, size)
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
            source = read_gpr(cpu, insn.rm) & mask
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
            write_gpr(cpu, insn.reg, result, size)
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


HANDLERS: dict[str, Handler] = {
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
    "fwait": _fwait,
    "fninit": _fninit,
    "popcnt": _bit_count("popcnt"),
    "tzcnt": _bit_count("tzcnt"),
    "lzcnt": _bit_count("lzcnt"),
    "clac": _access_check(set_it=False),
    "stac": _access_check(set_it=True),
}
