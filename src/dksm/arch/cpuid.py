"""What CPUID tells a guest: KVM's supported leaves, made true for this VM.

``KVM_GET_SUPPORTED_CPUID`` is a starting point, not an answer.  Per vCPU the VMM
must say which CPU it is and how many there are, and on this project's hosts (PVM,
docs/BOOT.md) KVM leaves out features the guest can in fact use.  The rules, each for
a guest that needs it:

- Leaf 1: EBX carries the vCPU's initial APIC id, the logical-processor count and the
  CLFLUSH line size (Unikraft indexes its per-CPU table with the APIC id, and the raw
  value is the host's); EDX's HTT bit is set when there is more than one vCPU; ECX
  says "hypervisor present" and offers the TSC-deadline timer, which the in-kernel
  LAPIC emulates.
- RDRAND (leaf 1 ECX bit 30) and RDSEED (leaf 7 EBX bit 18) are offered when the host
  CPU has them (the kernel's ``/proc/cpuinfo`` flags), even when KVM's list omits
  them: Unikraft's libukrandom refuses to boot without both.  A guest that executes
  one where KVM cannot gets it executed by the VMM (the emulation fallback), from the
  kernel's random source.
- Leaf 0xB (x2APIC topology): one thread per core, ``vcpu_count`` cores, EDX the
  vCPU's x2APIC id.  AMD's leaf 0x80000008 ECX says the same core count.
- The hypervisor leaves: 0x40000000 keeps KVM's signature and reaches 0x40000010,
  whose EAX is the TSC frequency in kHz and EBX the LAPIC timer's in kHz (VMware's
  convention, which Unikraft and others read).  With them a guest need not
  calibrate its TSC against the PIT (Unikraft spends 0.1 s doing so).
"""

from __future__ import annotations

from dksm.kvm import abi
from dksm.value import Value

LEAF_FEATURES = 1
LEAF_EXTENDED_FEATURES = 7
LEAF_TOPOLOGY = 0xB
LEAF_HYPERVISOR = 0x4000_0000
LEAF_HYPERVISOR_TIMING = 0x4000_0010
LEAF_AMD_SIZES = 0x8000_0008

EDX_HTT = 1 << 28
ECX_TSC_DEADLINE = 1 << 24
ECX_RDRAND = 1 << 30
ECX_HYPERVISOR = 1 << 31
EBX7_RDSEED = 1 << 18
CLFLUSH_LINE_SIZE_QWORDS = 8

# Leaf 0xB: level types in ECX[15:8].
TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2

# KVM's LAPIC timer counts at 1 GHz (one tick per nanosecond of its bus clock).
LAPIC_TIMER_KHZ = 1_000_000

CPUINFO_PATH = "/proc/cpuinfo"


class CpuidPolicy(Value):
    """What the VMM decided about the VM's CPUs; the same for every vCPU."""

    __slots__ = ("rdrand", "rdseed", "tsc_khz", "vcpu_count")

    def __init__(
        self,
        vcpu_count: int,
        # Host CPU features the guest may use although KVM does not list them.
        rdrand: bool = False,
        rdseed: bool = False,
        # The TSC frequency to announce in leaf 0x40000010; None hides the leaf.
        tsc_khz: int | None = None,
    ) -> None:
        self.vcpu_count = vcpu_count
        self.rdrand = rdrand
        self.rdseed = rdseed
        self.tsc_khz = tsc_khz


def host_cpu_flags(path: str = CPUINFO_PATH) -> frozenset[str]:
    """The kernel's feature flags for the host's first CPU (``/proc/cpuinfo``)."""
    try:
        # ASCII text, read as UTF-8: that codec is loaded already, the ASCII one
        # would be imported for this one read (a third of a millisecond per start).
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _apic_id_bits(count: int) -> int:
    """Bits of the APIC id that number ``count`` cores (0 for one)."""
    return max(count - 1, 0).bit_length()


def _entry(function: int, index: int = 0, flags: int = 0, *regs: int) -> abi.CpuidEntry2:
    eax, ebx, ecx, edx = (*regs, 0, 0, 0, 0)[:4]
    return abi.CpuidEntry2(
        function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx
    )


def _topology(vcpu_index: int, vcpu_count: int) -> list[abi.CpuidEntry2]:
    significant = abi.KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    shift = _apic_id_bits(vcpu_count)
    return [
        _entry(LEAF_TOPOLOGY, 0, significant, 0, 1, TOPOLOGY_LEVEL_SMT << 8, vcpu_index),
        _entry(LEAF_TOPOLOGY, 1, significant, shift, vcpu_count,
               (TOPOLOGY_LEVEL_CORE << 8) | 1, vcpu_index),
        _entry(LEAF_TOPOLOGY, 2, significant, 0, 0, (TOPOLOGY_LEVEL_INVALID << 8) | 2,
               vcpu_index),
    ]  # fmt: skip


def vcpu_cpuid(
    supported: list[abi.CpuidEntry2], vcpu_index: int, policy: CpuidPolicy
) -> list[abi.CpuidEntry2]:
    """The CPUID table for vCPU ``vcpu_index``, from KVM's supported leaves."""
    count = policy.vcpu_count
    logical = 1 << _apic_id_bits(count)
    entries: list[abi.CpuidEntry2] = []
    for original in supported:
        entry = abi.CpuidEntry2.from_buffer_copy(original)
        function = entry.function
        if function in (LEAF_TOPOLOGY, LEAF_HYPERVISOR_TIMING):
            continue  # written below
        if function == LEAF_FEATURES:
            entry.ebx = ((vcpu_index << 24) | (logical << 16) | (CLFLUSH_LINE_SIZE_QWORDS << 8)) | (
                entry.ebx & 0xFF
            )
            entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE
            if policy.rdrand:
                entry.ecx |= ECX_RDRAND
            if count > 1:
                entry.edx |= EDX_HTT
        elif function == LEAF_EXTENDED_FEATURES and entry.index == 0 and policy.rdseed:
            entry.ebx |= EBX7_RDSEED
        elif function == LEAF_AMD_SIZES:
            # ECX[7:0] cores per package - 1, ECX[15:12] APIC id bits for them.
            entry.ecx = (entry.ecx & ~0xF0FF) | (_apic_id_bits(count) << 12) | (count - 1)
        elif function == LEAF_HYPERVISOR and policy.tsc_khz is not None:
            entry.eax = max(entry.eax, LEAF_HYPERVISOR_TIMING)
        entries.append(entry)
    if any(e.function == LEAF_TOPOLOGY for e in supported):
        entries.extend(_topology(vcpu_index, count))
    if policy.tsc_khz is not None:
        entries.append(_entry(LEAF_HYPERVISOR_TIMING, 0, 0, policy.tsc_khz, LAPIC_TIMER_KHZ))
    return entries
