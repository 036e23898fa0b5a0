"""Run one instruction natively on the host CPU, for comparison with dksm's emulator.

A small assembly stub (built with gcc into a shared object at test time, called
through ctypes) loads the general registers, RFLAGS and an FXSAVE image (x87,
MXCSR, XMM0-15) from a state block, calls the instruction bytes placed in an
executable page followed by ``ret``, and stores everything back, including an
FXSAVE64 image of the state after the instruction.  The host's own MXCSR and x87
state are restored before returning to Python.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
from pathlib import Path

from dksm.x86emu.registers import REGISTER_COUNT, RFLAGS, RIP

# struct native_state (offsets used by the stub below)
REGS_OFFSET = 0  # 16 GPRs, kvm_regs order
RFLAGS_OFFSET = 128
FX_IN_OFFSET = 192  # FXSAVE64 image loaded before the instruction
FX_OUT_OFFSET = 704  # FXSAVE64 image stored after it
STATE_SIZE = 1216

_GPR_LOADS = [
    ("rax", 0),
    ("rbx", 8),
    ("rcx", 16),
    ("rdx", 24),
    ("rsi", 32),
    ("rbp", 56),
    ("r8", 64),
    ("r9", 72),
    ("r10", 80),
    ("r11", 88),
    ("r12", 96),
    ("r13", 104),
    ("r14", 112),
    ("r15", 120),
]

STUB = (
    """
    .text
    .globl run_native
    .type run_native, @function
run_native:                     /* rdi = state, rsi = code */
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    sub $8, %rsp
    stmxcsr (%rsp)              /* the host's MXCSR, restored at the end */
    push %rdi
    mov %rsi, code_ptr(%rip)
    fninit
    fxrstor64 """
    + str(FX_IN_OFFSET)
    + """(%rdi)
    pushq """
    + str(RFLAGS_OFFSET)
    + """(%rdi)
    popfq
"""
    + "".join(f"    mov {off}(%rdi), %{reg}\n" for reg, off in _GPR_LOADS)
    + """    mov 40(%rdi), %rdi
    call *code_ptr(%rip)
    pushfq
    push %rdi
    mov 16(%rsp), %rdi
"""
    + "".join(f"    mov %{reg}, {off}(%rdi)\n" for reg, off in _GPR_LOADS)
    + """    pop %rax
    mov %rax, 40(%rdi)
    pop %rax
    mov %rax, """
    + str(RFLAGS_OFFSET)
    + """(%rdi)
    fxsave64 """
    + str(FX_OUT_OFFSET)
    + """(%rdi)
    pop %rdi
    fninit
    ldmxcsr (%rsp)
    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    .data
code_ptr: .quad 0
    .section .note.GNU-stack,"",@progbits
"""
)


class NativeCpu:
    """The stub, loaded; :meth:`run` executes instruction bytes on a state."""

    def __init__(self, workdir: Path) -> None:
        source = workdir / "native_stub.S"
        library = workdir / "native_stub.so"
        source.write_text(STUB)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-nostdlib", "-o", str(library), str(source)], check=True
        )
        self._lib = ctypes.CDLL(str(library))
        self._run = self._lib.run_native
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._run.restype = None
        self._code = mmap.mmap(
            -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        )
        self._code_address = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
        # 64-byte aligned state block.
        self._raw = ctypes.create_string_buffer(STATE_SIZE + 64)
        base = ctypes.addressof(self._raw)
        self._state_address = (base + 63) & ~63
        self._state = (ctypes.c_char * STATE_SIZE).from_address(self._state_address)

    @property
    def code_address(self) -> int:
        """Where the instruction runs (its RIP, for RIP-relative operands)."""
        return self._code_address

    def run(self, code: bytes, regs: list[int], fx_image: bytes) -> tuple[list[int], bytes]:
        """Execute ``code``; returns (registers in kvm_regs order with rip and rflags,
        the FXSAVE64 image after it).  ``regs[RSP]`` is ignored (the stub's stack)."""
        self._code[: len(code) + 1] = code + b"\xc3"
        view = memoryview(self._state).cast("B")
        view[:] = bytes(STATE_SIZE)
        view[REGS_OFFSET : REGS_OFFSET + 128] = b"".join(r.to_bytes(8, "little") for r in regs[:16])
        view[RFLAGS_OFFSET : RFLAGS_OFFSET + 8] = regs[RFLAGS].to_bytes(8, "little")
        view[FX_IN_OFFSET : FX_IN_OFFSET + 512] = fx_image
        self._run(self._state_address, self._code_address)
        out = [int.from_bytes(view[8 * i : 8 * i + 8], "little") for i in range(16)]
        out += [0] * (REGISTER_COUNT - 16)
        out[RIP] = self._code_address + len(code)
        out[RFLAGS] = int.from_bytes(view[RFLAGS_OFFSET : RFLAGS_OFFSET + 8], "little")
        return out, bytes(view[FX_OUT_OFFSET : FX_OUT_OFFSET + 512])
