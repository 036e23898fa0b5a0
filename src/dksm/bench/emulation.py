"""The cost of one instruction executed by the VMM's emulation fallback.

On a PVM host every SSE instruction in guest kernel mode is a round trip: an exit
to the VMM, decoding and executing it in Python, XSAVE state read and written back
through ioctls, and re-entry.  This benchmark boots tiny guests (machine code
written here, no compiler needed) that run a loop of ``iterations`` iterations,
each one body instruction plus ``dec``/``jnz``, and times each whole run:

- ``plain1`` / ``plain2``: one or two ``add``, which the host's KVM emulates itself;
  their difference is what one KVM-emulated instruction costs.
- ``sse``: ``paddq`` (reads and writes XMM: both XSAVE ioctls);
- ``sse-read``: ``movq %xmm0, %rax`` (reads XMM only: no write-back);
- ``batch8``: eight SSE instructions in a row, which one exit covers.

Per emulated instruction: (case - plain1) per iteration, plus one KVM-emulated
instruction (the one the body replaced), divided by the instructions per
iteration.  Each figure is the median over ``runs`` VMs.
"""

from __future__ import annotations

import io
import os
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass, field

from dksm.error import DksmError

GUEST_BASE = 0x100000
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_CODE_OFFSET = 0x1000

# Machine code pieces (64-bit).
_ENABLE_SSE = bytes.fromhex("0f20e0 480d00060000 0f22e0")  # cr4 |= OSFXSR | OSXMMEXCPT
_DEC_ECX = bytes.fromhex("ffc9")
_SHUTDOWN = bytes.fromhex("66ba6400 b0fe ee f4")  # outb 0xfe -> 0x64 (i8042 reset), hlt
BODIES: dict[str, tuple[bytes, int]] = {
    # name: (loop body, how many of its instructions the fallback executes)
    "plain1": (bytes.fromhex("4801d8"), 0),  # add %rbx, %rax
    "plain2": (bytes.fromhex("4801d8 4801d8"), 0),
    "sse": (bytes.fromhex("660fd4c1"), 1),  # paddq %xmm1, %xmm0
    "sse-read": (bytes.fromhex("66480f7ec0"), 1),  # movq %xmm0, %rax
    "batch8": (
        bytes.fromhex(
            "660fd4c1"  # paddq %xmm1, %xmm0
            "660ffed1"  # paddd %xmm1, %xmm2
            "660fefd8"  # pxor %xmm0, %xmm3
            "660f70e01b"  # pshufd $0x1b, %xmm0, %xmm4
            "660f60ea"  # punpcklbw %xmm2, %xmm5
            "660fdbf3"  # pand %xmm3, %xmm6
            "660febfc"  # por %xmm4, %xmm7
            "660ffbc5"  # psubq %xmm5, %xmm0
        ),
        8,
    ),
}


class EmulationBenchError(DksmError):
    """A benchmark guest did not run to its end."""


def guest_image(body: bytes, iterations: int) -> bytes:
    """An ELF image: enable SSE, run ``body`` ``iterations`` times, shut down."""
    loop = body + _DEC_ECX
    back = -(len(loop) + 6)  # jnz rel32 back to the loop's start
    code = (
        _ENABLE_SSE
        + b"\xb9"
        + iterations.to_bytes(4, "little")  # mov $iterations, %ecx
        + loop
        + b"\x0f\x85"
        + back.to_bytes(4, "little", signed=True)
        + _SHUTDOWN
    )
    header = _ELF_HEADER.pack(
        b"\x7fELF\x02\x01\x01" + bytes(9),  # 64-bit, little-endian, version 1
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        GUEST_BASE,  # entry
        _ELF_HEADER.size,  # program headers right after this header
        0,
        0,
        _ELF_HEADER.size,
        _PROGRAM_HEADER.size,
        1,
        64,
        0,
        0,
    )
    segment = _PROGRAM_HEADER.pack(
        1, 5, _CODE_OFFSET, GUEST_BASE, GUEST_BASE, len(code), len(code), 0x1000
    )  # PT_LOAD, R+X
    image = header + segment
    return image + bytes(_CODE_OFFSET - len(image)) + code


@dataclass(frozen=True)
class CaseResult:
    name: str
    emulated_per_iteration: int
    iteration_us: tuple[float, ...]  # one per run
    emulated_instructions: int  # in the last run
    emulation_exits: int
    vmm_us_per_exit: float

    @property
    def median_iteration_us(self) -> float:
        return statistics.median(self.iteration_us)


@dataclass(frozen=True)
class EmulationBenchResult:
    iterations: int
    runs: int
    cases: dict[str, CaseResult] = field(default_factory=dict)

    @property
    def kvm_instruction_us(self) -> float:
        """One instruction the host's KVM emulates itself (plain2 - plain1)."""
        c = self.cases
        return c["plain2"].median_iteration_us - c["plain1"].median_iteration_us

    def per_instruction_us(self, name: str) -> float:
        """One instruction executed by the fallback, round trip included."""
        case = self.cases[name]
        extra = case.median_iteration_us - self.cases["plain1"].median_iteration_us
        return (extra + self.kvm_instruction_us) / max(case.emulated_per_iteration, 1)

    @property
    def fallback_used(self) -> bool:
        return self.cases["sse"].emulation_exits > 0

    def to_json(self) -> dict[str, object]:
        return {
            "iterations": self.iterations,
            "runs": self.runs,
            "fallback_used": self.fallback_used,
            "kvm_instruction_us": self.kvm_instruction_us,
            "emulated_instruction_us_median": self.per_instruction_us("sse"),
            "cases": {
                name: {
                    "iteration_us_median": case.median_iteration_us,
                    "iteration_us": list(case.iteration_us),
                    "per_emulated_instruction_us": (
                        self.per_instruction_us(name) if case.emulated_per_iteration else None
                    ),
                    "emulated_instructions": case.emulated_instructions,
                    "emulation_exits": case.emulation_exits,
                    "vmm_us_per_exit": case.vmm_us_per_exit,
                }
                for name, case in self.cases.items()
            },
        }

    def table(self) -> str:
        rows = [
            f"emulation fallback, {self.iterations} loop iterations x {self.runs} runs "
            "(medians, µs)",
            "case       per iteration  per emulated insn  exits/run  VMM per exit",
        ]
        for name, case in self.cases.items():
            per = (
                f"{self.per_instruction_us(name):17.1f}"
                if case.emulated_per_iteration
                else (" " * 17)
            )
            rows.append(
                f"{name:<10} {case.median_iteration_us:13.1f}  {per}  "
                f"{case.emulation_exits:9d}  {case.vmm_us_per_exit:12.1f}"
            )
        rows.append(f"one instruction emulated by the host's KVM: {self.kvm_instruction_us:.2f} µs")
        if not self.fallback_used:
            rows.append("the fallback was not used: this host's KVM runs SSE itself")
        return "\n".join(rows)


def _run_case(name: str, iterations: int, mem_mib: int) -> tuple[float, int, int, float]:
    from dksm.vmm.builder import build
    from dksm.vmm.config import VmConfig
    from dksm.vmm.emulation import EmulationStats
    from dksm.vmm.machine import ExitCause

    body, _ = BODIES[name]
    fd, path = tempfile.mkstemp(prefix=f"dksm-bench-{name}-", suffix=".elf")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(guest_image(body, iterations))
        config = VmConfig(
            kernel_path=path, boot_args="", mem_mib=mem_mib, vcpu_count=1, initrd_path=None
        )
        with build(config, serial_sink=io.BytesIO()) as vm:
            start = time.perf_counter()
            outcome = vm.run(timeout=600)
            elapsed = time.perf_counter() - start
            fallback = vm.threads[0].emulation  # None: no instruction needed it
            stats = fallback.stats() if fallback is not None else EmulationStats(0, 0, 0.0)
    finally:
        os.unlink(path)
    if outcome.cause != ExitCause.GUEST_SHUTDOWN:
        raise EmulationBenchError(f"benchmark guest '{name}' ended: {outcome.describe()}")
    per_exit = stats.seconds / stats.exits * 1e6 if stats.exits else 0.0
    return elapsed / iterations * 1e6, stats.instructions, stats.exits, per_exit


def measure_emulation(
    iterations: int = 2000, runs: int = 5, mem_mib: int = 16
) -> EmulationBenchResult:
    """Time the fallback on this host; see the module docstring for the method."""
    if iterations < 1 or iterations >= 1 << 31:
        raise EmulationBenchError(f"iterations must be between 1 and 2^31, not {iterations}")
    if runs < 1:
        raise EmulationBenchError(f"runs must be at least 1, not {runs}")
    cases: dict[str, CaseResult] = {}
    samples: dict[str, list[tuple[float, int, int, float]]] = {name: [] for name in BODIES}
    for _ in range(runs):  # interleaved, so drifts in host load hit every case alike
        for name in BODIES:
            samples[name].append(_run_case(name, iterations, mem_mib))
    for name, runs_of in samples.items():
        last = runs_of[-1]
        cases[name] = CaseResult(
            name=name,
            emulated_per_iteration=BODIES[name][1],
            iteration_us=tuple(s[0] for s in runs_of),
            emulated_instructions=last[1],
            emulation_exits=last[2],
            vmm_us_per_exit=statistics.median(s[3] for s in runs_of),
        )
    return EmulationBenchResult(iterations=iterations, runs=runs, cases=cases)
