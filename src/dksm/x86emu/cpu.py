"""What an instruction is executed against: the :class:`Cpu` protocol and the vector state.

A :class:`Cpu` is a register file in ``kvm_regs`` order, control registers, a
memory that reads and writes by linear address, and the x87/SSE/AVX state as an
XSAVE area (:class:`VectorState`).  The VMM backs it by a vCPU and guest RAM
(:mod:`dksm.vmm.emulation`); the tests back it by lists and a ``bytearray``.
:class:`ExecutionError` is how every handler refuses an instruction.  Facts from
the Intel SDM volume 1, chapter 13 (XSAVE); no code from elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dksm.error import DksmError
from dksm.x86emu.decode import Instruction

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Protocol

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


if TYPE_CHECKING:  # protocols: for the type checker only

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


if TYPE_CHECKING:

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
