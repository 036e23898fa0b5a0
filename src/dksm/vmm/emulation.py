"""The emulation-failure fallback: instructions the host's KVM cannot emulate, done here.

On a PVM host (docs/BOOT.md, last section) guest kernel-mode code is run by the host
kernel's instruction emulator.  It runs plain SSE moves and ``fxsave`` itself,
but not SSE arithmetic and shuffles, ``ldmxcsr``/``stmxcsr``, ``xgetbv``,
``xsaveopt``/``xsavec``/``xrstor``: it answers with ``KVM_EXIT_INTERNAL_ERROR`` / emulation
failure, and running again fails at the same RIP.  :class:`EmulationFallback`
decodes the instruction (:mod:`dksm.x86emu.decode`), executes it against the
vCPU (:mod:`dksm.x86emu.execute` on a :class:`VcpuCpu`), advances RIP and lets the
vCPU loop re-enter the guest.  On hardware KVM it is never called.

Over 500 lines and kept whole: everything here is the one bridge between a vCPU and
the emulator (the CPU view over ``kvm_run``, the batching loop, its statistics and the
messages that name an instruction it cannot run), and each part reads the same
per-vCPU state; split, they would pass that state around instead of owning it.

Design, by measurement (``dksm bench emulation``; this host, PVM):

- Every vCPU ioctl costs about 6 µs and ``KVM_RUN`` with two emulated instructions
  about 9 µs, so ioctls, not Python, set the price.  Registers therefore travel in
  ``kvm_run.s`` (``KVM_CAP_SYNC_REGS``): KVM stores general and special registers
  at every exit and loads the general ones at entry when marked dirty, which saves
  ``GET_REGS``, ``SET_REGS`` and ``GET_SREGS`` on every instruction.
- The XSAVE area is read (``KVM_GET_XSAVE``) only for instructions that touch
  vector state, and written back only if they changed it.  It is never cached
  across exits: the guest's own emulator changes XMM registers too (its SSE moves).
- Decoding is cached by the instruction's bytes; guest page tables are walked
  here (``KVM_TRANSLATE`` would be one ioctl per page).
- After one instruction, the following ones are executed too while this module
  knows them (a vectorised loop body is mostly SSE): one exit covers the run.
  Batching stops at the first instruction that is not known or would fault; that
  one goes back to the guest, which runs it or exits on it again, and a fault is
  reported then.

  Result: about 28 µs per instruction that reads and writes XMM registers, 21 µs
  for one that only reads them, 7 µs each in a run of eight (medians, round trip
  included; one instruction the host emulates itself costs 0.6 µs).
- Instructions without hand-written code (SSSE3, SSE4 integer ...) go to the
  Unicorn engine when it is installed (:mod:`dksm.vmm.emulation_unicorn`, GPL,
  optional): about 260 µs each, right for a long tail only.

Counters (:attr:`EmulationFallback.counts`, :meth:`EmulationFallback.stats`):
instructions executed here by mnemonic, exits that led here, time spent here.

An instruction that cannot be executed exactly raises :class:`EmulationError`
whose message gives RIP, the bytes, a disassembly when a disassembler is available,
the CPU mode and CPL, and the reason.  Guests never run on with a wrong result.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from dksm.error import DksmError
from dksm.kvm import abi, exits
from dksm.kvm.system import Kvm, Vcpu
from dksm.value import Value
from dksm.x86emu import decode as x86_decode
from dksm.x86emu import execute as x86_execute
from dksm.x86emu.cpu import DEFAULT_LAYOUT, X87_COMPONENT, ExecutionError, VectorState
from dksm.x86emu.decode import DecodeError, Instruction
from dksm.x86emu.opcodes import MAX_INSTRUCTION_LENGTH
from dksm.x86emu.paging import PAGE_MASK, PAGE_SIZE, PageWalker, PagingMode, page_pieces
from dksm.x86emu.registers import CR0_PE, EFER_LMA, FLAG_TF, MASK64, RFLAGS, RIP

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.vmm.emulation_unicorn import UnicornExecutor
    from dksm.x86emu.cpu import Handler

    _Decoded = tuple[Instruction, Handler, str]

# Instructions executed per exit at most: bounds how long an exit can delay a
# pending interrupt (each costs a few µs here).
BATCH_LIMIT = 64
# Decoded instructions kept (keyed by their bytes); cleared when full.
DECODE_CACHE_LIMIT = 1 << 16
XSAVE_CPUID_LEAF = 0xD
INT3 = b"\xcc"
BREAKPOINT_VECTOR = 3  # #BP
XSAVE_COMPACTED_ALIGNED = 1 << 1  # CPUID.(0xD, i):ECX: 64-byte aligned when compacted


class EmulationError(DksmError):
    """The fallback cannot execute the guest's instruction; the message says why."""


class EmulationStats(Value):
    """What the fallback did during a VM's life."""

    __slots__ = ("by_mnemonic", "exits", "instructions", "seconds")

    def __init__(
        self,
        instructions: int,
        exits: int,
        seconds: float,
        by_mnemonic: dict[str, int] | None = None,
    ) -> None:
        self.instructions = instructions
        self.exits = exits
        self.seconds = seconds
        self.by_mnemonic = {} if by_mnemonic is None else by_mnemonic

    def describe(self) -> str:
        if not self.instructions:
            return "no instructions emulated"
        per = self.seconds / self.exits * 1e6 if self.exits else 0.0
        names = ", ".join(f"{k}={v}" for k, v in sorted(self.by_mnemonic.items()))
        return (
            f"{self.instructions} instructions emulated in {self.exits} exits "
            f"({per:.1f} µs per exit in the VMM): {names}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "instructions": self.instructions,
            "exits": self.exits,
            "seconds": self.seconds,
            "by_mnemonic": dict(self.by_mnemonic),
        }


def describe_mode(sregs: abi.Sregs) -> str:
    """The CPU mode and CPL, e.g. "64-bit mode, CPL 0"."""
    cpl = sregs.cs.selector & 3
    if not sregs.cr0 & CR0_PE:
        return "real mode"
    if sregs.efer & EFER_LMA:
        kind = "64-bit mode" if sregs.cs.l else "compatibility mode"
    else:
        kind = "protected mode"
    return f"{kind}, CPL {cpl}"


def xsave_layout(kvm: Kvm) -> tuple[dict[int, tuple[int, int]], frozenset[int]]:
    """(offset, size) of each extended XSAVE component KVM supports (CPUID 0xD),
    and the components the compacted format aligns to 64 bytes (ECX bit 1).

    ``KVM_GET_XSAVE`` uses the host's standard-format layout, which these leaves
    describe; AVX is at 576 everywhere, but AVX-512 differs between vendors.
    """
    layout = dict(DEFAULT_LAYOUT)
    aligned = set()
    for entry in kvm.supported_cpuid():
        if entry.function == XSAVE_CPUID_LEAF and entry.index >= 2 and entry.eax and entry.ebx:
            layout[entry.index] = (entry.ebx, entry.eax)
            if entry.ecx & XSAVE_COMPACTED_ALIGNED:
                aligned.add(entry.index)
    return layout, frozenset(aligned)


class VcpuCpu:
    """A :class:`dksm.x86emu.cpu.Cpu` backed by a stopped vCPU and guest RAM.

    Valid for one exit at a time: :meth:`begin` binds it to the current exit,
    :meth:`commit` hands the changes back to KVM.
    """

    def __init__(self, kvm: Kvm, vcpu: Vcpu, ram: memoryview) -> None:
        self._kvm = kvm
        self._vcpu = vcpu
        self._ram = ram
        self._ram_size = len(ram)
        self._walker = PageWalker(ram)
        run = vcpu.run_state
        self._run = run
        # Registers: in kvm_run.s when KVM syncs them, else fetched by ioctl.
        self._sync = kvm.check_extension(abi.KVM_CAP_SYNC_REGS) & (
            abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
        ) == (abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS)
        self._synced = False  # KVM has filled kvm_run.s at this exit
        if self._sync:
            run.kvm_valid_regs |= abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
        self._sync_regs = memoryview(run.s.regs).cast("B").cast("Q")
        self._sync_sregs = run.s.sregs
        self._own_regs = abi.Regs()
        self._own_regs_view = memoryview(self._own_regs).cast("B").cast("Q")
        self._regs: memoryview = self._sync_regs
        self._sregs: abi.Sregs = self._sync_sregs
        # Vector state: loaded lazily, once per exit.
        self._area = bytearray(ctypes.sizeof(abi.Xsave))
        self._vector: VectorState | None = None
        self._vector_loaded = False
        self._xcr0: int | None = None
        self._tlb: dict[int, int] = {}

    # -- per exit ------------------------------------------------------------------

    def begin(self) -> None:
        """Bind to the exit that just happened."""
        if self._sync and self._synced:
            self._regs = self._sync_regs
            self._sregs = self._sync_sregs
        else:
            # The first exit after enabling sync regs (or a KVM without them).
            self._vcpu_get_regs()
            self._sregs = self._vcpu.get_sregs()
        self._vector_loaded = False
        self._xcr0 = None
        self._tlb.clear()

    def commit(self) -> None:
        """Give the registers (and vector state, if changed) back to KVM."""
        vector = self._vector
        if self._vector_loaded and vector is not None and vector.changed:
            vector.settle()
            self._vcpu.set_xsave(self._area)
        if self._regs is self._sync_regs:
            self._run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS
        else:
            self._vcpu.set_regs(self._own_regs)
        # From the next exit on, KVM fills kvm_run.s (valid_regs was set at start).
        self._synced = self._sync

    def _vcpu_get_regs(self) -> None:
        fresh = self._vcpu.get_regs()
        ctypes.memmove(
            ctypes.addressof(self._own_regs), ctypes.addressof(fresh), ctypes.sizeof(abi.Regs)
        )
        self._regs = self._own_regs_view

    @property
    def sregs(self) -> abi.Sregs:
        return self._sregs

    # -- the Cpu protocol ----------------------------------------------------------

    @property
    def regs(self) -> memoryview:
        return self._regs

    @property
    def cr0(self) -> int:
        cr0: int = self._sregs.cr0
        return cr0

    @property
    def cr4(self) -> int:
        cr4: int = self._sregs.cr4
        return cr4

    def segment_base(self, segment: str) -> int:
        if segment == "fs":
            fs: int = self._sregs.fs.base
            return fs
        if segment == "gs":
            gs: int = self._sregs.gs.base
            return gs
        return 0

    def vector(self) -> VectorState:
        if not self._vector_loaded:
            self._vcpu.get_xsave(self._area)
            if self._vector is None:
                layout, aligned = xsave_layout(self._kvm)
                self._vector = VectorState(self._area, layout, aligned)
            else:
                self._vector.refresh()
            self._vector_loaded = True
        assert self._vector is not None
        return self._vector

    def xcr0(self) -> int:
        if self._xcr0 is None:
            xcrs = self._vcpu.get_xcrs()
            values: dict[int, int] = {
                xcrs.xcrs[i].xcr: xcrs.xcrs[i].value for i in range(xcrs.nr_xcrs)
            }
            self._xcr0 = values.get(abi.XCR_XFEATURE_ENABLED_MASK, X87_COMPONENT)
        return self._xcr0

    def read(self, address: int, size: int) -> bytes:
        offset = address & PAGE_MASK
        if offset + size <= PAGE_SIZE:
            physical = self._translate(address, write=False) + offset
            return bytes(self._ram[physical : physical + size])
        out = bytearray()
        for start, length in page_pieces(address, size):
            physical = self._translate(start, write=False) + (start & PAGE_MASK)
            out += self._ram[physical : physical + length]
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        # Translate (and check) every page before writing any byte.
        pieces = [
            (self._translate(start, write=True) + (start & PAGE_MASK), length)
            for start, length in page_pieces(address, len(data))
        ]
        done = 0
        for physical, length in pieces:
            self._ram[physical : physical + length] = data[done : done + length]
            done += length

    def fetch(self, address: int, size: int) -> bytes:
        """Instruction bytes at ``address``; as many as are mapped and executable."""
        out = b""
        for start, length in page_pieces(address, size):
            try:
                physical = self._translate(start, write=False, fetch=True) + (start & PAGE_MASK)
            except ExecutionError:
                break
            out += self._ram[physical : physical + length]
        return out

    # -- paging --------------------------------------------------------------------

    def _translate(self, address: int, write: bool, fetch: bool = False) -> int:
        """The guest-physical address of the page holding linear ``address``."""
        key = (address >> 12) << 2 | write << 1 | fetch
        cached = self._tlb.get(key)
        if cached is not None:
            return cached
        physical = self._walk(address, write, fetch)
        if physical + PAGE_SIZE > self._ram_size:
            raise ExecutionError(
                "-",
                f"linear {address:#x} maps to guest-physical {physical:#x}, "
                "which is not RAM (MMIO is not emulated for these instructions)",
            )
        self._tlb[key] = physical
        return physical

    def _walk(self, address: int, write: bool, fetch: bool) -> int:
        sregs = self._sregs
        return self._walker.walk(
            address,
            PagingMode(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs.selector & 3),
            write=write,
            fetch=fetch,
        )


class EmulationFallback:
    """Executes what KVM could not, for one vCPU.  Create it before the first run.

    ``ram`` is guest RAM from guest-physical 0, mapped at host ``ram_address``.
    ``long_tail`` allows the optional Unicorn engine for XMM integer instructions
    without hand-written code (see :mod:`dksm.vmm.emulation_unicorn`).  Setting
    ``batching`` to False makes every instruction its own exit (for measuring).
    """

    def __init__(
        self,
        kvm: Kvm,
        vcpu: Vcpu,
        ram: memoryview,
        ram_address: int,
        long_tail: bool = True,
        exclusive: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        # ``exclusive`` holds the VM's other vCPUs outside the guest: a locked
        # instruction (lock cmpxchg16b) done here must be atomic for all of them.
        self._exclusive = exclusive
        self._vcpu = vcpu
        self._cpu = VcpuCpu(kvm, vcpu, ram)
        self._ram_address = ram_address
        self._ram_size = len(ram)
        self._long_tail_wanted = long_tail
        self._long_tail_missing = False  # Unicorn is not installed (checked once)
        self._long_tail: UnicornExecutor | None = None
        self._long_tail_names: dict[bytes, str] = {}
        self._decoded: dict[bytes, _Decoded | str] = {}
        # Addresses where the instruction after an emulated one was not one of
        # ours last time: batching is not tried there again.  Only a shortcut: a
        # stale entry costs an exit, never correctness.
        self._batch_ends: set[int] = set()
        self._counts: dict[str, int] = {}
        self._instructions = 0
        self._exits = 0
        self._seconds = 0.0
        self.batching = True

    @property
    def counts(self) -> dict[str, int]:
        """Instructions executed here, by mnemonic (a copy)."""
        return dict(self._counts)

    def stats(self) -> EmulationStats:
        return EmulationStats(self._instructions, self._exits, self._seconds, self.counts)

    def handle(self) -> None:
        """Execute the instruction of the current emulation-failure exit (and the
        ones after it it can), so that the next ``KVM_RUN`` resumes past them.

        Raises :class:`EmulationError` when it cannot.
        """
        start = time.perf_counter()
        cpu = self._cpu
        cpu.begin()
        failure = exits.decode(self._vcpu.run_state)
        code = failure.instruction if isinstance(failure, exits.EmulationFailure) else b""
        regs = cpu.regs
        rip = regs[RIP]
        try:
            if not code:
                code = cpu.fetch(rip, MAX_INSTRUCTION_LENGTH)
            sregs = cpu.sregs
            if not (sregs.efer & EFER_LMA and sregs.cs.l):
                raise EmulationError(self._message(code, "only 64-bit code is emulated"))
            if code[:1] == INT3:
                self._breakpoint(cpu)
                return
            if regs[RFLAGS] & FLAG_TF:
                raise EmulationError(
                    self._message(code, "single-stepping (RFLAGS.TF) is not emulated")
                )
            decoded = self._decode(code)
            if isinstance(decoded, str):
                self._run_long_tail(code, decoded)
                cpu.commit()
                return
            insn, handler, name = decoded
            if insn.length > len(code):  # KVM gave fewer bytes than the instruction has
                decoded = self._decode(cpu.fetch(rip, MAX_INSTRUCTION_LENGTH))
                if isinstance(decoded, str):
                    raise EmulationError(self._message(code, decoded))
                insn, handler, name = decoded
            try:
                if insn.lock and self._exclusive is not None:
                    with self._exclusive():
                        x86_execute.execute(cpu, insn, handler)
                else:
                    x86_execute.execute(cpu, insn, handler)
            except ExecutionError as exc:
                raise EmulationError(self._message(insn.code, str(exc))) from exc
            self._count(name)
            if self.batching:
                self._run_on(cpu)
            cpu.commit()
        finally:
            self._exits += 1
            self._seconds += time.perf_counter() - start

    def _breakpoint(self, cpu: VcpuCpu) -> None:
        """int3 in kernel mode, which the PVM host's emulator refuses (Linux runs one
        at boot to test its breakpoint handler): deliver #BP through the guest's
        IDT.  #BP is a trap, so the return address the guest sees is the byte
        after the int3: RIP moves past it, then KVM injects the exception."""
        regs = cpu.regs
        regs[RIP] = (regs[RIP] + len(INT3)) & MASK64
        cpu.commit()
        events = self._vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = BREAKPOINT_VECTOR
        events.exception.has_error_code = 0
        events.exception.pending = 0
        events.exception.error_code = 0
        self._vcpu.set_vcpu_events(events)
        self._count("int3")

    def _run_on(self, cpu: VcpuCpu) -> None:
        """Execute the instructions that follow while they are known and complete."""
        regs = cpu.regs
        for _ in range(BATCH_LIMIT - 1):
            rip = regs[RIP]
            if rip in self._batch_ends:
                return
            code = cpu.fetch(rip, MAX_INSTRUCTION_LENGTH)
            decoded = self._decode(code)
            if isinstance(decoded, str):
                if len(self._batch_ends) >= DECODE_CACHE_LIMIT:
                    self._batch_ends.clear()
                self._batch_ends.add(rip)
                return
            insn, handler, name = decoded
            if insn.length > len(code) or (insn.lock and self._exclusive is not None):
                return  # incomplete, or needs the other vCPUs held: an exit of its own
            try:
                x86_execute.execute(cpu, insn, handler)
            except ExecutionError:
                return  # untouched: the guest meets it again, and we report it then
            self._count(name)

    def _run_long_tail(self, code: bytes, reason: str) -> None:
        """Execute an instruction without hand-written code on Unicorn, if it is an
        XMM integer instruction and Unicorn is installed; else say why not."""
        shape = x86_decode.instruction_shape(code)
        if shape is None or shape.kind != x86_decode.XMM_INTEGER:
            raise EmulationError(self._message(code, reason))
        executor = self._long_tail_executor()
        if executor is None:
            hint = (
                "the optional Unicorn engine would run it (pip install 'dksm[emulation]')"
                if self._long_tail_wanted
                else "the Unicorn long tail is disabled"
            )
            raise EmulationError(self._message(code, f"{reason}; {hint}"))
        try:
            executor.execute(self._cpu, shape.length)
        except ExecutionError as exc:
            raise EmulationError(self._message(code, f"{exc} (in the Unicorn engine)")) from exc
        self._count(self._long_tail_name(code[: shape.length]))

    def _long_tail_executor(self) -> UnicornExecutor | None:
        if self._long_tail is None and self._long_tail_wanted and not self._long_tail_missing:
            from dksm.vmm import emulation_unicorn

            if emulation_unicorn.available():
                self._long_tail = emulation_unicorn.UnicornExecutor(
                    self._ram_address, self._ram_size
                )
            else:
                self._long_tail_missing = True
        return self._long_tail

    def _long_tail_name(self, code: bytes) -> str:
        name = self._long_tail_names.get(code)
        if name is None:
            from dksm.x86emu.disassemble import disassemble

            found = disassemble(code)
            name = found.text.split()[0] if found else f"simd {code.hex(' ')}"
            self._long_tail_names[code] = name
        return name

    def _decode(self, code: bytes) -> _Decoded | str:
        """The decoded instruction and its handler, or why there is none (cached)."""
        cached = self._decoded.get(code)
        if cached is not None:
            return cached
        result: _Decoded | str
        try:
            insn = x86_decode.decode(code)
            result = (insn, x86_execute.handler_for(insn), x86_execute.display_name(insn))
        except DecodeError as exc:
            result = str(exc)
        if len(self._decoded) >= DECODE_CACHE_LIMIT:
            self._decoded.clear()
        self._decoded[code] = result
        return result

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1
        self._instructions += 1

    def _message(self, code: bytes, reason: str) -> str:
        return failure_message(self._cpu.regs[RIP], code, describe_mode(self._cpu.sregs), reason)


def failure_message(rip: int, code: bytes, mode: str, reason: str) -> str:
    """One line for the user: where, which bytes, what instruction, which mode, why."""
    from dksm.x86emu.disassemble import disassemble

    shown = code
    text = "no disassembler available (install capstone or binutils)"
    found = disassemble(code, rip) if code else None
    if found is not None:
        shown = code[: found.length]
        text = found.text
    elif code:
        text = "unknown to the disassembler"
    hex_bytes = shown.hex(" ") if shown else "unavailable"
    return f"at rip {rip:#x} ({mode}), instruction bytes: {hex_bytes} ({text}): {reason}"
