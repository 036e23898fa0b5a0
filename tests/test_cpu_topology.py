"""What the guest is told about its CPUs, checked without a VM: CPUID per vCPU and the
MP table, parsed back field by field as a guest parses them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dksm.arch import cpuid, layout, mptable
from dksm.kvm import abi


def _supported() -> list[abi.CpuidEntry2]:
    """A KVM-like list: vendor leaf, features without RDRAND, leaf 7 without RDSEED,
    a topology leaf, AMD sizes, KVM's own signature leaf."""
    rows = [
        (0, 0, 0, 0x1C, 0x68747541, 0x444D4163, 0x69746E65),
        (1, 0, 0, 0xA10F11, 0x05020800, 0x01202000, 0x078BFBFF),
        (7, 0, 1, 1, 0x01800002, 0x104, 0),
        (0xB, 0, 1, 0, 0, 0, 1),
        (0x80000008, 0, 0, 0x3030, 0, 0x7001, 0),
        (0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
    ]
    return [
        abi.CpuidEntry2(function=f, index=i, flags=fl, eax=a, ebx=b, ecx=c, edx=d)
        for f, i, fl, a, b, c, d in rows
    ]


def _leaf(entries: list[abi.CpuidEntry2], function: int, index: int = 0) -> abi.CpuidEntry2:
    (entry,) = [e for e in entries if e.function == function and e.index == index]
    return entry


def test_each_vcpu_sees_its_own_apic_id_and_the_cpu_count() -> None:
    policy = cpuid.CpuidPolicy(vcpu_count=3)
    for index in range(3):
        entries = cpuid.vcpu_cpuid(_supported(), index, policy)
        leaf1 = _leaf(entries, 1)
        assert leaf1.ebx >> 24 == index
        assert (leaf1.ebx >> 16) & 0xFF == 4  # rounded up to a power of two
        assert leaf1.edx & cpuid.EDX_HTT
        assert leaf1.ecx & cpuid.ECX_HYPERVISOR
        core_level = _leaf(entries, 0xB, 1)
        assert (core_level.eax, core_level.ebx, core_level.edx) == (2, 3, index)
        assert (core_level.ecx >> 8) & 0xFF == cpuid.TOPOLOGY_LEVEL_CORE
        assert _leaf(entries, 0xB, 2).ecx >> 8 == cpuid.TOPOLOGY_LEVEL_INVALID
        assert _leaf(entries, 0x80000008).ecx & 0xFF == 2


def test_a_single_vcpu_has_no_htt_bit() -> None:
    entries = cpuid.vcpu_cpuid(_supported(), 0, cpuid.CpuidPolicy(vcpu_count=1))
    assert not _leaf(entries, 1).edx & cpuid.EDX_HTT
    assert (_leaf(entries, 1).ebx >> 16) & 0xFF == 1


def test_random_number_instructions_are_offered_when_the_host_has_them() -> None:
    offered = cpuid.vcpu_cpuid(
        _supported(), 0, cpuid.CpuidPolicy(vcpu_count=1, rdrand=True, rdseed=True)
    )
    assert _leaf(offered, 1).ecx & cpuid.ECX_RDRAND
    assert _leaf(offered, 7).ebx & cpuid.EBX7_RDSEED
    plain = cpuid.vcpu_cpuid(_supported(), 0, cpuid.CpuidPolicy(vcpu_count=1))
    assert not _leaf(plain, 1).ecx & cpuid.ECX_RDRAND
    assert not _leaf(plain, 7).ebx & cpuid.EBX7_RDSEED


def test_the_tsc_frequency_leaf_is_reachable_only_when_announced() -> None:
    entries = cpuid.vcpu_cpuid(_supported(), 0, cpuid.CpuidPolicy(vcpu_count=1, tsc_khz=2_596_140))
    hypervisor = _leaf(entries, cpuid.LEAF_HYPERVISOR)
    assert hypervisor.eax == cpuid.LEAF_HYPERVISOR_TIMING
    assert struct.pack("<III", hypervisor.ebx, hypervisor.ecx, hypervisor.edx) == b"KVMKVMKVM\0\0\0"
    timing = _leaf(entries, cpuid.LEAF_HYPERVISOR_TIMING)
    assert (timing.eax, timing.ebx) == (2_596_140, cpuid.LAPIC_TIMER_KHZ)
    hidden = cpuid.vcpu_cpuid(_supported(), 0, cpuid.CpuidPolicy(vcpu_count=1))
    assert _leaf(hidden, cpuid.LEAF_HYPERVISOR).eax == 0x40000001
    assert not [e for e in hidden if e.function == cpuid.LEAF_HYPERVISOR_TIMING]


def test_host_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu rdrand sse2 rdseed\n\nprocessor\t: 1\n")
    assert cpuid.host_cpu_flags(str(path)) == {"fpu", "rdrand", "sse2", "rdseed"}
    assert cpuid.host_cpu_flags(str(path) + ".missing") == frozenset()


def _parse_mp(table: bytes, base: int) -> tuple[list[tuple[int, int]], int, list[bytes]]:
    """As a guest reads it: (apic id, flags) per processor, the IOAPIC id, entry kinds."""
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    config = struct.unpack_from("<I", table, 4)[0] - base
    assert table[config : config + 4] == b"PCMP"
    (length,) = struct.unpack_from("<H", table, config + 4)
    (count,) = struct.unpack_from("<H", table, config + 34)
    assert sum(table[config : config + length]) % 256 == 0
    at = config + 44
    cpus, kinds, ioapic = [], [], -1
    for _ in range(count):
        kind = table[at]
        kinds.append(bytes([kind]))
        if kind == mptable.ENTRY_PROCESSOR:
            cpus.append((table[at + 1], table[at + 3]))
            at += 20
        else:
            if kind == mptable.ENTRY_IOAPIC:
                ioapic = table[at + 1]
            at += 8
    assert at == config + length
    return cpus, ioapic, kinds


@pytest.mark.parametrize("count", [1, 2, 7, 32])
def test_mp_table_lists_every_vcpu_with_the_first_as_bootstrap(count: int) -> None:
    table = mptable.mp_table(count)
    assert layout.MP_TABLE_ADDR + len(table) <= layout.EBDA_END
    cpus, ioapic, kinds = _parse_mp(table, layout.MP_TABLE_ADDR)
    assert [apic for apic, _ in cpus] == list(range(count))
    assert cpus[0][1] == mptable.CPU_ENABLED | mptable.CPU_BOOTSTRAP
    assert all(flags == mptable.CPU_ENABLED for _, flags in cpus[1:])
    assert ioapic == count  # the first id after the CPUs'
    assert kinds.count(bytes([mptable.ENTRY_IO_INTERRUPT])) == mptable.ISA_IRQS
    assert kinds.count(bytes([mptable.ENTRY_LOCAL_INTERRUPT])) == 2


def test_mp_table_refuses_more_cpus_than_fit() -> None:
    with pytest.raises(ValueError, match="1 to 32"):
        mptable.mp_table(33)
