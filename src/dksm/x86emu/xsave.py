"""MXCSR, XCR0 and the state-save instructions: ``ldmxcsr``/``stmxcsr``, ``xgetbv``,
``fxsave``/``fxrstor`` and the XSAVE family in the standard and compacted formats.

Facts from the Intel SDM volumes 1 (chapter 13, XSAVE) and 2; no code from elsewhere.
"""

from __future__ import annotations

from dksm.x86emu.cpu import (
    AVX_COMPONENT,
    COMPACTED_FORMAT,
    FCW_RESET,
    FDP,
    FIP,
    HEADER_END,
    LEGACY_END,
    MXCSR,
    MXCSR_RESET,
    SSE_COMPONENT,
    ST0,
    X87_COMPONENT,
    XCOMP_BV,
    XMM0,
    XSTATE_BV,
    ExecutionError,
    VectorState,
)
from dksm.x86emu.decode import Instruction
from dksm.x86emu.operands import (
    aligned_address,
    check_sse,
    check_xsave,
    effective_address,
    store_operand,
)
from dksm.x86emu.registers import MASK32, RAX, RCX, RDX

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.x86emu.cpu import Cpu, Handler


def _ldmxcsr(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    value = int.from_bytes(cpu.read(effective_address(cpu, insn), 4), "little")
    vec = cpu.vector()
    if value & ~vec.mxcsr_mask:
        raise ExecutionError("#GP", f"ldmxcsr of {value:#x} sets reserved MXCSR bits")
    vec.set_mxcsr(value)


def _stmxcsr(cpu: Cpu, insn: Instruction) -> None:
    check_sse(cpu, insn)
    store_operand(cpu, insn, cpu.vector().mxcsr, 4)


def _xgetbv(cpu: Cpu, insn: Instruction) -> None:
    check_xsave(cpu, insn)
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
    check_sse(cpu, insn)
    address = aligned_address(cpu, insn, 16)
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
    check_sse(cpu, insn)
    address = aligned_address(cpu, insn, 16)
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
    check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = aligned_address(cpu, insn, 64)
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
    check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = aligned_address(cpu, insn, 64)
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
    check_xsave(cpu, insn)
    vec = cpu.vector()
    rfbm = _requested(cpu, insn, vec)
    address = aligned_address(cpu, insn, 64)
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
    "ldmxcsr": _ldmxcsr,
    "stmxcsr": _stmxcsr,
    "xgetbv": _xgetbv,
    "fxsave": _fxsave,
    "fxrstor": _fxrstor,
    "xsave": _xsave,
    "xsaveopt": _xsave,
    "xrstor": _xrstor,
    "xsavec": _xsavec,
}
