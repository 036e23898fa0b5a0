"""The emulator core on plain state, no KVM: decoding, faults, XSAVE semantics,
guest page walks, and the KVM ABI pieces the fallback relies on."""

from __future__ import annotations

import ctypes
import struct

import pytest

from dksm.kvm import abi
from dksm.vmm.emulation import failure_message
from dksm.x86emu.cpu import (
    AVX_COMPONENT,
    MXCSR,
    SSE_COMPONENT,
    X87_COMPONENT,
    XMM0,
    XSTATE_BV,
    ExecutionError,
    VectorState,
)
from dksm.x86emu.decode import XMM_INTEGER, DecodeError, decode, instruction_shape
from dksm.x86emu.execute import execute
from dksm.x86emu.paging import PageWalker, PagingMode
from dksm.x86emu.registers import (
    CR0_TS,
    CR4_OSFXSR,
    RAX,
    RCX,
    RDX,
    REGISTER_COUNT,
    RFLAGS,
    RIP,
    RSI,
)
from plain_cpu import PlainCpu

BASE = 0x10000


def _cpu(
    memory_size: int = 0x4000,
    vector: VectorState | None = None,
    cr0: int = 0x80000033,
    cr4: int = CR4_OSFXSR | (1 << 18),
    xcr0: int = 0x3,
    gs_base: int = 0,
) -> PlainCpu:
    regs = [0] * REGISTER_COUNT
    regs[RIP] = 0x100000
    regs[RSI] = BASE
    return PlainCpu(
        regs=regs,
        memory=bytearray(memory_size),
        memory_base=BASE,
        vector=vector,
        cr0=cr0,
        cr4=cr4,
        xcr0=xcr0,
        gs_base=gs_base,
    )


def _run(cpu: PlainCpu, hex_code: str) -> None:
    execute(cpu, decode(bytes.fromhex(hex_code) + bytes(15)))


# -- decoding -----------------------------------------------------------------------


def test_decoder_measures_prefixed_instructions() -> None:
    insn = decode(bytes.fromhex("f3 41 0f 7f 84 24 00 01 00 00") + bytes(5))  # movdqu store
    assert insn.mnemonic == "movdqu.store" and insn.length == 10 and insn.reg == 0
    assert insn.memory is not None and insn.memory.base == 12 and insn.memory.disp == 0x100


def test_decoder_says_why_it_refuses() -> None:
    for code, reason in (
        ("0f 58 c1", "floating-point"),
        ("66 0f 38 00 c1", "SSSE3/SSE4"),
        ("c5 f1 ef c9", "VEX"),
        ("0f ef c1", "MMX"),
        ("f0 66 0f ef c1", "lock prefix"),
        ("66 0f 71 00 03", "memory operand"),  # psrlw $3 exists only on a register
    ):
        with pytest.raises(DecodeError, match=reason):
            decode(bytes.fromhex(code) + bytes(12))


def test_truncated_bytes_are_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="end inside"):
        decode(bytes.fromhex("66 0f 6f 84 24"))


def test_shape_measures_simd_instructions_it_does_not_execute() -> None:
    shape = instruction_shape(bytes.fromhex("66 0f 3a 0f c1 08") + bytes(9))  # palignr
    assert shape is not None and shape.length == 6 and shape.kind == XMM_INTEGER
    assert instruction_shape(bytes.fromhex("48 01 d8") + bytes(12)) is None  # add


# -- addressing -----------------------------------------------------------------------


def test_rip_relative_operand_is_relative_to_the_next_instruction() -> None:
    cpu = _cpu()
    cpu.regs[RIP] = BASE + 0x100
    cpu.memory[0x200:0x210] = bytes(range(16))
    # movdqu 0xf8(%rip), %xmm3: 8 bytes long, so the operand is at rip + 8 + 0xf8.
    _run(cpu, "f3 0f 6f 1d f8 00 00 00")
    assert cpu.vector_state.xmm(3) == int.from_bytes(bytes(range(16)), "little")
    assert cpu.regs[RIP] == BASE + 0x108


def test_address_size_prefix_truncates_the_address() -> None:
    cpu = _cpu()
    cpu.regs[RSI] = (0xFFFF_FFFF << 32) | BASE
    cpu.memory[0:16] = b"\x11" * 16
    _run(cpu, "67 66 0f 6f 06")  # movdqa (%esi), %xmm0
    assert cpu.vector_state.xmm(0) == int.from_bytes(b"\x11" * 16, "little")


def test_gs_override_adds_the_gs_base() -> None:
    cpu = _cpu(gs_base=BASE + 0x40)
    cpu.regs[RSI] = 0x10
    cpu.memory[0x50:0x60] = b"\x22" * 16
    _run(cpu, "65 66 0f 6f 06")  # movdqa %gs:(%rsi), %xmm0
    assert cpu.vector_state.xmm(0) == int.from_bytes(b"\x22" * 16, "little")


def test_operand_crossing_the_end_of_memory_faults() -> None:
    cpu = _cpu(memory_size=0x1008)
    cpu.regs[RSI] = BASE + 0x1000
    with pytest.raises(ExecutionError, match="#PF"):
        _run(cpu, "f3 0f 6f 06")  # movdqu (%rsi), %xmm0


# -- faults leave the state as it was -------------------------------------------------------


def _snapshot(cpu: PlainCpu) -> tuple[list[int], bytes, bytes]:
    return list(cpu.regs), bytes(cpu.memory), bytes(cpu.vector_state.area)


@pytest.mark.parametrize(
    ("code", "setup", "exception"),
    [
        ("66 0f ef 06", "misaligned", "#GP"),  # pxor (%rsi): m128 must be aligned
        ("66 0f 7f 46 04", "misaligned", "#GP"),  # movdqa store
        ("0f ae 0e", "misaligned", "#GP"),  # fxrstor
        ("66 0f ef c1", "no_osfxsr", "#UD"),
        ("66 0f ef c1", "ts", "#NM"),
        ("0f 01 d0", "bad_xcr", "#GP"),  # xgetbv of XCR2
        ("0f ae 16", "bad_mxcsr", "#GP"),  # ldmxcsr with reserved bits
        ("0f ae 2e", "compacted", "#GP"),  # xrstor: XSTATE_BV outside XCOMP_BV
        ("0f ae 2e", "compacted_unknown", "-"),  # xrstor: a component without layout
        ("9b", "pending_x87", "#MF"),  # fwait with an unmasked x87 exception pending
    ],
)
def test_a_fault_changes_nothing(code: str, setup: str, exception: str) -> None:
    cpu = _cpu(
        cr4=(0 if setup == "no_osfxsr" else CR4_OSFXSR) | (1 << 18),
        cr0=0x80000033 | (CR0_TS if setup == "ts" else 0),
    )
    cpu.regs[RSI] = BASE + (8 if setup == "misaligned" else 0)
    cpu.regs[RCX] = 2 if setup == "bad_xcr" else 0
    cpu.regs[RAX] = 3
    if setup == "bad_mxcsr":
        cpu.memory[0:4] = (0xFFFF_0000).to_bytes(4, "little")
    if setup == "compacted":
        cpu.memory[XSTATE_BV : XSTATE_BV + 16] = (3).to_bytes(8, "little") + (1 << 63 | 1).to_bytes(
            8, "little"
        )
    if setup == "pending_x87":
        cpu.vector_state.area[2] = 0x80  # FSW.ES
    if setup == "compacted_unknown":
        cpu = _cpu(xcr0=0x207)
        cpu.regs[RSI] = BASE
        cpu.regs[RAX] = 3
        cpu.memory[XSTATE_BV + 8 : XSTATE_BV + 16] = (1 << 63 | 0x203).to_bytes(8, "little")
    before = _snapshot(cpu)
    with pytest.raises(ExecutionError) as caught:
        _run(cpu, code)
    assert caught.value.exception == exception
    assert _snapshot(cpu) == before


# -- MXCSR, XCR0, XSAVE ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "source", "result", "flags"),
    [
        ("f3 48 0f b8 c7", 0, 0, 0x40),  # popcnt %rdi, %rax: ZF for a zero source
        ("f3 48 0f b8 c7", 0xF0F0, 8, 0),
        ("f3 48 0f bc c7", 0, 64, 0x01),  # tzcnt: CF and the operand width
        ("f3 48 0f bc c7", 0x8, 3, 0),
        ("f3 0f bd c7", 0, 32, 0x01),  # lzcnt %edi, %eax
        ("f3 0f bd c7", 0x8000_0000, 0, 0x40),  # ZF for a zero result
    ],
)
def test_bit_counts_of_edge_values(code: str, source: int, result: int, flags: int) -> None:
    cpu = _cpu()
    cpu.regs[5] = source  # rdi
    cpu.regs[RFLAGS] = 0x202 | 0x800  # OF stays, as on the host
    _run(cpu, code)
    assert cpu.regs[RAX] == result
    assert cpu.regs[RFLAGS] == 0x202 | (0 if "b8" in code else 0x800) | flags


def test_clac_and_stac_toggle_only_the_alignment_check_flag() -> None:
    cpu = _cpu()
    cpu.regs[RFLAGS] = 0x246
    _run(cpu, "0f 01 cb")  # stac
    assert cpu.regs[RFLAGS] == 0x246 | 1 << 18
    assert cpu.regs[RIP] == 0x100003
    _run(cpu, "0f 01 ca")  # clac
    assert cpu.regs[RFLAGS] == 0x246


def test_xgetbv_of_xcr1_reports_components_in_use() -> None:
    cpu = _cpu(xcr0=0x7)
    cpu.vector_state.in_use = SSE_COMPONENT | AVX_COMPONENT
    cpu.regs[RCX] = 1
    _run(cpu, "0f 01 d0")
    assert (cpu.regs[RAX], cpu.regs[RDX]) == (0x6, 0)


def test_xsave_then_xrstor_restores_every_component() -> None:
    layout = {2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024)}  # AMD AVX-512
    vec = VectorState.reset(layout)
    area = vec.area
    for offset, size in [(XMM0, 256), *layout.values()]:
        area[offset : offset + size] = bytes((offset + i) & 0xFF for i in range(size))
    struct.pack_into("<I", area, MXCSR, 0x7F80)
    vec.in_use = 0xE7 & ~X87_COMPONENT
    cpu = _cpu(memory_size=0x2000, vector=vec, xcr0=0xE7)
    cpu.regs[RAX] = 0xFFFF_FFFF
    cpu.regs[RDX] = 0xFFFF_FFFF
    saved = bytes(area)
    _run(cpu, "48 0f ae 26")  # xsave64 (%rsi)
    assert int.from_bytes(cpu.memory[XSTATE_BV : XSTATE_BV + 8], "little") == 0xE6
    for offset, size in layout.values():
        assert cpu.memory[offset : offset + size] == saved[offset : offset + size]
    area[:] = bytes(len(area))  # clobber everything
    struct.pack_into("<II", area, MXCSR, 0x1F80, 0xFFFF)
    cpu.regs[RIP] = 0x100000
    _run(cpu, "48 0f ae 2e")  # xrstor64 (%rsi)
    assert area[XMM0:416] == saved[XMM0:416]
    assert struct.unpack_from("<I", area, MXCSR)[0] == 0x7F80
    for offset, size in layout.values():
        assert area[offset : offset + size] == saved[offset : offset + size]
    assert vec.in_use == 0xE6


def test_xrstor_initialises_components_the_header_marks_unused() -> None:
    vec = VectorState.reset()
    vec.area[XMM0 : XMM0 + 16] = b"\xff" * 16
    cpu = _cpu(vector=vec, xcr0=0x3)
    cpu.regs[RAX] = 0x3
    cpu.memory[MXCSR : MXCSR + 4] = (0x1F80).to_bytes(4, "little")
    cpu.memory[XMM0 : XMM0 + 16] = b"\x77" * 16  # ignored: XSTATE_BV says SSE is initial
    _run(cpu, "0f ae 2e")  # xrstor (%rsi)
    assert vec.xmm(0) == 0
    assert vec.in_use == 0
    vec.settle()  # MXCSR was loaded: SSE stays marked so KVM takes it
    assert vec.area[XSTATE_BV] == SSE_COMPONENT


AMD_AVX512_LAYOUT = {2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024)}


def _patterned(layout: dict[int, tuple[int, int]]) -> VectorState:
    vec = VectorState.reset(layout)
    area = vec.area
    for offset, size in [(XMM0, 256), *layout.values()]:
        area[offset : offset + size] = bytes((offset + i) & 0xFF for i in range(size))
    return vec


def test_xsavec_packs_requested_components_in_bit_order() -> None:
    vec = _patterned(AMD_AVX512_LAYOUT)
    struct.pack_into("<I", vec.area, MXCSR, 0x7F80)
    vec.in_use = 0xE7 & ~X87_COMPONENT & ~(1 << 6)  # x87 and ZMM_Hi256 initial
    cpu = _cpu(memory_size=0x2000, vector=vec, xcr0=0xE7)
    cpu.memory[:] = b"\xaa" * len(cpu.memory)
    cpu.regs[RAX] = 0xE3  # everything but AVX
    saved = bytes(vec.area)
    _run(cpu, "48 0f c7 26")  # xsavec64 (%rsi)
    memory = cpu.memory
    assert int.from_bytes(memory[XSTATE_BV : XSTATE_BV + 8], "little") == 0xA2
    assert int.from_bytes(memory[XSTATE_BV + 8 : XSTATE_BV + 16], "little") == 1 << 63 | 0xE3
    assert memory[XSTATE_BV + 16 : XSTATE_BV + 64] == b"\xaa" * 48  # not written
    assert memory[0:MXCSR] == b"\xaa" * MXCSR  # x87 not in use: not written
    assert struct.unpack_from("<I", memory, MXCSR)[0] == 0x7F80
    assert memory[XMM0:416] == saved[XMM0:416]
    # Opmask right after the header, ZMM_Hi256 after it (not in use: untouched),
    # Hi16_ZMM after that: AVX, not requested, takes no room.
    assert memory[576:640] == saved[832:896]
    assert memory[640:1152] == b"\xaa" * 512
    assert memory[1152:2176] == saved[1408:2432]


def test_xsavec_then_xrstor_restores_every_component() -> None:
    vec = _patterned(AMD_AVX512_LAYOUT)
    struct.pack_into("<I", vec.area, MXCSR, 0x7F80)
    vec.in_use = 0xE7 & ~X87_COMPONENT
    cpu = _cpu(memory_size=0x2000, vector=vec, xcr0=0xE7)
    cpu.regs[RAX] = 0xFFFF_FFFF
    cpu.regs[RDX] = 0xFFFF_FFFF
    saved = bytes(vec.area)
    _run(cpu, "0f c7 26")  # xsavec (%rsi)
    vec.area[:] = bytes(len(vec.area))  # clobber everything
    struct.pack_into("<II", vec.area, MXCSR, 0x1F80, 0xFFFF)
    vec.in_use = 0xE7
    cpu.regs[RIP] = 0x100000
    _run(cpu, "48 0f ae 2e")  # xrstor64 (%rsi): the compacted form
    assert vec.area[XMM0:416] == saved[XMM0:416]
    assert struct.unpack_from("<I", vec.area, MXCSR)[0] == 0x7F80
    for offset, size in AMD_AVX512_LAYOUT.values():
        assert vec.area[offset : offset + size] == saved[offset : offset + size]
    assert struct.unpack_from("<H", vec.area, 0)[0] == 0x037F  # x87 initialised
    assert vec.in_use == 0xE6


def test_compacted_xrstor_aligns_components_cpuid_marks() -> None:
    layout = {5: (832, 8), 6: (896, 512)}  # a made-up 8-byte component before an aligned one
    vec = VectorState.reset(layout, aligned=frozenset({6}))
    cpu = _cpu(memory_size=0x2000, vector=vec, xcr0=0x63)
    cpu.regs[RAX] = 0x63
    cpu.memory[XSTATE_BV : XSTATE_BV + 16] = (0x60).to_bytes(8, "little") + (
        1 << 63 | 0x60
    ).to_bytes(8, "little")
    cpu.memory[576:584] = b"\x11" * 8
    cpu.memory[640:1152] = b"\x22" * 512  # 584 rounded up to 64
    _run(cpu, "0f ae 2e")  # xrstor (%rsi)
    assert vec.area[832:840] == b"\x11" * 8
    assert vec.area[896:1408] == b"\x22" * 512


def test_compacted_xrstor_resets_mxcsr_with_sse() -> None:
    vec = VectorState.reset()
    struct.pack_into("<I", vec.area, MXCSR, 0x7F80)
    cpu = _cpu(vector=vec, xcr0=0x7)
    cpu.regs[RAX] = 0x6  # SSE and AVX requested
    cpu.memory[MXCSR : MXCSR + 4] = (0x3F80).to_bytes(4, "little")  # ignored: SSE initial
    cpu.memory[XSTATE_BV + 8 : XSTATE_BV + 16] = (1 << 63 | 0x7).to_bytes(8, "little")
    _run(cpu, "0f ae 2e")  # xrstor (%rsi)
    assert struct.unpack_from("<I", vec.area, MXCSR)[0] == 0x1F80


def test_xsave_of_a_component_without_layout_is_refused() -> None:
    cpu = _cpu(xcr0=0x207)  # PKRU (bit 9) enabled, no layout given for it
    cpu.regs[RAX] = 0x207
    with pytest.raises(ExecutionError, match="known layout"):
        _run(cpu, "0f ae 26")


# -- guest page walks ---------------------------------------------------------------------


def _ram_with_tables() -> memoryview:
    """1 MiB of RAM: PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000.

    Linear 0x200000 is a 2 MiB page at physical 0; linear 0x400000-0x401fff are
    4 KiB pages at 0x80000 (writable) and 0x81000 (read-only)."""
    ram = memoryview(bytearray(1 << 20))
    words = ram.cast("Q")
    words[0x1000 // 8] = 0x2003
    words[0x2000 // 8] = 0x3003
    words[0x3000 // 8 + 1] = 0x0083  # PD[1]: 2 MiB at 0
    words[0x3000 // 8 + 2] = 0x4003  # PD[2]: a page table
    words[0x4000 // 8] = 0x80003
    words[0x4000 // 8 + 1] = 0x81001
    return ram


MODE = PagingMode(cr0=0x80010033, cr3=0x1000, cr4=0x20, efer=0xD00, cpl=0)


def test_walker_follows_large_and_small_pages_and_sets_accessed_dirty() -> None:
    ram = _ram_with_tables()
    walker = PageWalker(ram)
    assert walker.walk(0x212345, MODE, write=False) == 0x12000
    assert walker.walk(0x400123, MODE, write=True) == 0x80000
    words = ram.cast("Q")
    assert words[0x4000 // 8] & 0x60 == 0x60  # accessed and dirty
    assert words[0x3000 // 8 + 1] & 0x60 == 0x20  # read: accessed only


def test_walker_enforces_write_protection_and_presence() -> None:
    walker = PageWalker(_ram_with_tables())
    with pytest.raises(ExecutionError, match="read-only"):
        walker.walk(0x401000, MODE, write=True)
    with pytest.raises(ExecutionError, match="not mapped"):
        walker.walk(0x402000, MODE, write=False)
    with pytest.raises(ExecutionError, match="non-canonical"):
        walker.walk(0x0000_8000_0000_0000, MODE, write=False)


# -- messages and the ABI ---------------------------------------------------------------------


def test_failure_message_names_rip_bytes_instruction_and_mode() -> None:
    text = failure_message(0x100084, bytes.fromhex("0f58c1") + bytes(12), "64-bit mode, CPL 0", "x")
    assert text.startswith("at rip 0x100084 (64-bit mode, CPL 0), instruction bytes: 0f 58 c1")
    assert "addps" in text or "no disassembler" in text


def test_sync_regs_and_xcrs_match_the_kernel_abi() -> None:
    assert abi.Run.kvm_valid_regs.offset == 288
    assert abi.Run.kvm_dirty_regs.offset == 296
    assert abi.Run.s.offset == 304
    assert ctypes.sizeof(abi.Xcrs) == 392
    assert ctypes.sizeof(abi.Xcrs) == (abi.KVM_GET_XCRS >> 16) & 0x3FFF


@pytest.mark.parametrize(
    ("code", "size"),
    [("0fc7f0", 4), ("480fc7f0", 8), ("660fc7f0", 2), ("0fc7f8", 4), ("490fc7f8", 8)],
)
def test_rdrand_and_rdseed_give_random_bits_and_report_success(code: str, size: int) -> None:
    """rdrand/rdseed eax|rax|ax|r8: new bits of the given width, CF = 1, OF SF ZF AF PF
    cleared; a 32-bit write clears the upper half, a 16-bit one keeps it."""
    results = set()
    for _ in range(4):
        cpu = _cpu()
        register = 8 if code.startswith("49") else RAX
        cpu.regs[register] = 0xFFFF_FFFF_FFFF_FFFF
        cpu.regs[17] = 0x2 | 0x8D4  # OF SF ZF AF PF set, CF clear
        execute(cpu, decode(bytes.fromhex(code)))
        value = cpu.regs[register]
        if size == 2:
            assert value >> 16 == 0xFFFF_FFFF_FFFF
        else:
            assert value < 1 << (8 * size)
        assert cpu.regs[17] == 0x2 | 0x1
        assert cpu.regs[RIP] == 0x100000 + len(code) // 2
        results.add(value)
    assert len(results) > 1


def test_rdrand_with_a_memory_operand_is_not_an_instruction() -> None:
    with pytest.raises(DecodeError):
        decode(bytes.fromhex("0fc730"))
