"""The ctypes ABI matches the kernel's sizes and offsets (numbers from docs/BOOT.md)."""

from __future__ import annotations

import ctypes

from dksm.kvm import abi


def test_struct_sizes_match_the_kernel() -> None:
    assert ctypes.sizeof(abi.UserspaceMemoryRegion) == 32
    assert ctypes.sizeof(abi.Regs) == 144
    assert ctypes.sizeof(abi.Segment) == 24
    assert ctypes.sizeof(abi.DescriptorTable) == 16
    assert ctypes.sizeof(abi.Sregs) == 312
    assert ctypes.sizeof(abi.Fpu) == 416
    assert ctypes.sizeof(abi.MsrEntry) == 16
    assert ctypes.sizeof(abi.CpuidEntry2) == 40
    assert ctypes.sizeof(abi.PitConfig) == 64
    assert ctypes.sizeof(abi.LapicState) == 1024
    assert ctypes.sizeof(abi.VcpuEvents) == 64
    assert ctypes.sizeof(abi.Xsave) == 4096
    assert ctypes.sizeof(abi.Translation) == 24


def test_sregs_field_offsets() -> None:
    expected = {
        "cs": 0,
        "ldt": 168,
        "gdt": 192,
        "idt": 208,
        "cr0": 224,
        "cr2": 232,
        "cr3": 240,
        "cr4": 248,
        "cr8": 256,
        "efer": 264,
        "apic_base": 272,
        "interrupt_bitmap": 280,
    }
    for name, offset in expected.items():
        assert getattr(abi.Sregs, name).offset == offset, name


def test_fpu_and_run_offsets() -> None:
    assert abi.Fpu.fcw.offset == 128
    assert abi.Fpu.mxcsr.offset == 408
    assert abi.Run.exit_reason.offset == 8
    assert abi.Run.exit.offset == 32
    assert abi.RunIo.data_offset.offset == 8  # kvm_run + 40
    assert abi.RunMmio.len.offset == 16  # kvm_run + 48
    assert abi.RunMmio.is_write.offset == 20  # kvm_run + 52


def test_variable_length_structs_have_their_headers() -> None:
    assert ctypes.sizeof(abi.msrs_struct(3)) == 8 + 3 * 16
    assert ctypes.sizeof(abi.cpuid2_struct(80)) == 8 + 80 * 40


def test_ioctl_numbers_encode_their_struct_sizes() -> None:
    # _IOC size field (bits 16-29) must equal the struct the ioctl carries.
    def size_of(request: int) -> int:
        return (request >> 16) & 0x3FFF

    assert size_of(abi.KVM_SET_USER_MEMORY_REGION) == ctypes.sizeof(abi.UserspaceMemoryRegion)
    assert size_of(abi.KVM_GET_REGS) == ctypes.sizeof(abi.Regs)
    assert size_of(abi.KVM_SET_SREGS) == ctypes.sizeof(abi.Sregs)
    assert size_of(abi.KVM_GET_FPU) == ctypes.sizeof(abi.Fpu)
    assert size_of(abi.KVM_GET_LAPIC) == ctypes.sizeof(abi.LapicState)
    assert size_of(abi.KVM_CREATE_PIT2) == ctypes.sizeof(abi.PitConfig)
    assert size_of(abi.KVM_TRANSLATE) == ctypes.sizeof(abi.Translation)
    assert size_of(abi.KVM_GET_XSAVE) == ctypes.sizeof(abi.Xsave)
