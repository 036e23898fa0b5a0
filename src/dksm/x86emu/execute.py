"""The effect of the instructions :mod:`dksm.x86emu.decode` knows, on a plain CPU state.

An instruction is executed against a :class:`~dksm.x86emu.cpu.Cpu`: a register file in
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

from dksm.x86emu import sse, system, xsave
from dksm.x86emu.decode import Instruction
from dksm.x86emu.registers import MASK64, RIP

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.x86emu.cpu import Cpu, Handler

# One table over every family; the families hold disjoint mnemonics.
HANDLERS: dict[str, Handler] = {**sse.HANDLERS, **system.HANDLERS, **xsave.HANDLERS}


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
