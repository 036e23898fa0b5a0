"""The ctypes ABI is the kernel's: every ioctl number, constant, struct size and field
offset in dksm.kvm.abi is compared with what a C program compiled against the
installed kernel headers (linux/kvm.h) prints; the few numbers docs/BOOT.md gives
are checked without a compiler too."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

import kernel_headers
from dksm.kvm import abi

# Each Python struct and the C type it declares.  Variable-length structs are
# declared with no entry, and their flexible array checked through its first one.
STRUCTS: dict[str, tuple[type[ctypes.Structure], str]] = {
    "UserspaceMemoryRegion": (abi.UserspaceMemoryRegion, "struct kvm_userspace_memory_region"),
    "Regs": (abi.Regs, "struct kvm_regs"),
    "Segment": (abi.Segment, "struct kvm_segment"),
    "DescriptorTable": (abi.DescriptorTable, "struct kvm_dtable"),
    "Sregs": (abi.Sregs, "struct kvm_sregs"),
    "Fpu": (abi.Fpu, "struct kvm_fpu"),
    "MsrEntry": (abi.MsrEntry, "struct kvm_msr_entry"),
    "Msrs": (abi.msrs_struct(0), "struct kvm_msrs"),
    "CpuidEntry2": (abi.CpuidEntry2, "struct kvm_cpuid_entry2"),
    "Cpuid2": (abi.cpuid2_struct(0), "struct kvm_cpuid2"),
    "PitConfig": (abi.PitConfig, "struct kvm_pit_config"),
    "LapicState": (abi.LapicState, "struct kvm_lapic_state"),
    "IrqLevel": (abi.IrqLevel, "struct kvm_irq_level"),
    "IrqFd": (abi.IrqFd, "struct kvm_irqfd"),
    "IoEventFd": (abi.IoEventFd, "struct kvm_ioeventfd"),
    "Translation": (abi.Translation, "struct kvm_translation"),
    "Xsave": (abi.Xsave, "struct kvm_xsave"),
    "Xcr": (abi.Xcr, "struct kvm_xcr"),
    "Xcrs": (abi.Xcrs, "struct kvm_xcrs"),
    "VcpuEvents": (abi.VcpuEvents, "struct kvm_vcpu_events"),
    "SyncRegs": (abi.SyncRegs, "struct kvm_sync_regs"),
    "Run": (abi.Run, "struct kvm_run"),
}
# Where a Python path names something else in C: kvm_run's exit union is anonymous
# in C, and its ``s`` is a union whose ``regs`` member is what Python declares.
# (python prefix, C prefix): a prefix ending in "." applies to the paths under it.
C_RENAMES = {"Run": (("exit.", ""), ("s.", "s.regs."), ("s", "s.regs"))}
# Flexible arrays: C gives them no size.
FLEXIBLE = {"Msrs.entries", "Cpuid2.entries"}
# Structs Python declares only the head of (the rest of kvm_run is never read).
PREFIX_ONLY = {"Run"}

# The kernel's own spelling, where dksm corrects it.
C_CONSTANTS = {"KVM_CPUID_FLAG_SIGNIFICANT_INDEX": "KVM_CPUID_FLAG_SIGNIFCANT_INDEX"}

IOCTLS = [name for name in dir(abi) if name.startswith("KVM_") and name.isupper()]


def _fields(
    cls: type[ctypes.Structure | ctypes.Union], path: str
) -> Iterator[tuple[str, int, int]]:
    """(path, offset, size) of every field, nested fields and first array entries too."""
    for name, kind, *_ in cls._fields_:
        field = getattr(cls, name)
        here = f"{path}.{name}" if path else name
        yield here, field.offset, field.size
        inner = kind
        index = ""
        while issubclass(inner, ctypes.Array):
            index += "[0]"
            inner = inner._type_  # type: ignore[assignment]
        if issubclass(inner, (ctypes.Structure, ctypes.Union)):
            for sub, offset, size in _fields(inner, here + index):
                yield sub, field.offset + offset, size


def _c_path(struct: str, path: str) -> str:
    for python, c in C_RENAMES.get(struct, ()):
        if path == python or (python.endswith(".") and path.startswith(python)):
            return c + path[len(python) :]
    return path


def _python_facts() -> dict[str, int]:
    facts: dict[str, int] = {}
    for struct, (cls, _) in STRUCTS.items():
        facts[f"sizeof {struct}"] = ctypes.sizeof(cls)
        for path, offset, size in _fields(cls, ""):
            if struct == "Run" and path == "exit":
                continue  # the anonymous union itself: checked through its members
            facts[f"offset {struct}.{path}"] = offset
            if f"{struct}.{path}" not in FLEXIBLE:
                facts[f"size {struct}.{path}"] = size
    for name in IOCTLS:
        facts[name] = getattr(abi, name)
    for reason in abi.ExitReason:
        facts[f"KVM_EXIT_{reason.name}"] = int(reason)
    facts["KVM_NR_INTERRUPTS"] = abi.KVM_NR_INTERRUPTS
    return facts


def _c_expressions(facts: dict[str, int]) -> dict[str, str]:
    expressions = {}
    for key in facts:
        if key.startswith("sizeof "):
            expressions[key] = f"sizeof({STRUCTS[key.split()[1]][1]})"
        elif key.startswith(("offset ", "size ")):
            kind, full = key.split()
            struct, path = full.split(".", 1)
            ctype, member = STRUCTS[struct][1], _c_path(struct, path)
            if kind == "offset":
                expressions[key] = f"offsetof({ctype}, {member})"
            else:
                expressions[key] = f"sizeof((({ctype} *)0)->{member})"
        else:
            expressions[key] = C_CONSTANTS.get(key, key)
    return expressions


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    kernel_headers.require_headers("linux/kvm.h")
    workdir = tmp_path_factory.mktemp("kvm_abi")
    return kernel_headers.evaluate(workdir, ["linux/kvm.h"], _c_expressions(_python_facts()))


def test_every_struct_field_has_the_kernels_offset_and_size(kernel: dict[str, int]) -> None:
    python = _python_facts()
    fields = {k: v for k, v in python.items() if k.startswith(("offset ", "size "))}
    assert len(fields) > 300  # every struct, not a few
    wrong = {k: (v, kernel[k]) for k, v in fields.items() if kernel[k] != v}
    assert wrong == {}


def test_every_struct_has_the_kernels_size(kernel: dict[str, int]) -> None:
    for struct in STRUCTS:
        ours, theirs = _python_facts()[f"sizeof {struct}"], kernel[f"sizeof {struct}"]
        if struct in PREFIX_ONLY:
            assert ours <= theirs, struct
        else:
            assert ours == theirs, struct


def test_every_ioctl_number_and_constant_is_the_kernels(kernel: dict[str, int]) -> None:
    python = _python_facts()
    names = [k for k in python if k.startswith("KVM_")]
    assert "KVM_GET_XCRS" in names and "KVM_EXIT_SYSTEM_EVENT" in names
    wrong = {k: (hex(python[k]), hex(kernel[k])) for k in names if kernel[k] != python[k]}
    assert wrong == {}


def test_a_wrong_field_would_be_caught(kernel: dict[str, int]) -> None:
    """The comparison sees a field moved by one byte (it reads the kernel, not itself)."""

    class Shifted(ctypes.Structure):
        _fields_ = (("irq", ctypes.c_uint32), ("pad", ctypes.c_uint8), ("level", ctypes.c_uint32))

    offsets = {path: offset for path, offset, _ in _fields(Shifted, "")}
    assert offsets["level"] != kernel["offset IrqLevel.level"]


def test_ioctl_numbers_match_docs_boot_md() -> None:
    assert abi.KVM_GET_API_VERSION == 0xAE00
    assert abi.KVM_CREATE_VM == 0xAE01
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_CREATE_PIT2 == 0x4040AE77
    assert abi.KVM_IRQFD == 0x4020AE76
    assert abi.KVM_IOEVENTFD == 0x4040AE79
    assert abi.KVM_RUN == 0xAE80
    assert (abi.KVM_GET_REGS, abi.KVM_SET_REGS) == (0x8090AE81, 0x4090AE82)
    assert (abi.KVM_GET_SREGS, abi.KVM_SET_SREGS) == (0x8138AE83, 0x4138AE84)
    assert (abi.KVM_GET_FPU, abi.KVM_SET_FPU) == (0x81A0AE8C, 0x41A0AE8D)
    assert (abi.KVM_GET_LAPIC, abi.KVM_SET_LAPIC) == (0x8400AE8E, 0x4400AE8F)
    assert abi.KVM_SET_CPUID2 == abi.KVM_SET_MSRS - 0x89 + 0x90 == 0x4008AE90


def test_struct_sizes_and_offsets_match_docs_boot_md() -> None:
    assert ctypes.sizeof(abi.UserspaceMemoryRegion) == 32
    assert ctypes.sizeof(abi.Regs) == 144
    assert ctypes.sizeof(abi.Segment) == 24
    assert ctypes.sizeof(abi.Sregs) == 312
    assert ctypes.sizeof(abi.Fpu) == 416
    assert ctypes.sizeof(abi.CpuidEntry2) == 40
    assert abi.Sregs.interrupt_bitmap.offset == 280
    assert abi.Fpu.mxcsr.offset == 408
    assert abi.Run.exit.offset == 32
    assert abi.RunIo.data_offset.offset == 8  # kvm_run + 40
    assert abi.RunMmio.is_write.offset == 20  # kvm_run + 52
    assert abi.RunEmulationFailure.insn_bytes.offset == 17  # kvm_run + 49
