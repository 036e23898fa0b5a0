"""A test double of the emulator's CPU: plain values, no KVM."""

from __future__ import annotations

from dksm.x86emu.cpu import SSE_COMPONENT, X87_COMPONENT, ExecutionError, VectorState
from dksm.x86emu.registers import CR4_OSFXSR, CR4_OSXSAVE, REGISTER_COUNT


class PlainCpu:
    """A :class:`Cpu` made of plain values: registers in a list, memory a
    ``bytearray`` that starts at linear address ``memory_base``.  What the tests
    drive the emulator with, no KVM involved."""

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
