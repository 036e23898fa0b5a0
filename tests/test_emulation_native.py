"""Every emulated instruction family gives exactly what the host CPU gives.

Each case is assembled by the system assembler, then run on random registers,
flags, MXCSR, x87/XMM state and memory twice: natively (through the stub in
``native_cpu``) and by :func:`dksm.x86emu.execute.execute` on a
:class:`PlainCpu` holding the same values.  Registers, flags, memory and the
whole FXSAVE image (x87, MXCSR, XMM0-15) must be equal afterwards.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from dksm.arch.cpuid import host_cpu_flags
from dksm.x86emu.cpu import COMPACTED_FORMAT, LEGACY_END, MXCSR, XSTATE_BV, VectorState
from dksm.x86emu.decode import decode
from dksm.x86emu.execute import display_name, execute
from dksm.x86emu.registers import REGISTER_COUNT, RFLAGS, RIP, RSP
from native_cpu import NativeCpu
from plain_cpu import PlainCpu

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

TRIALS = 24
BUFFER_SIZE = 8192
# Registers that address the buffer in the cases below (kvm_regs indices).
RBX, RSI, RDI = 1, 4, 5
ARITHMETIC_FLAGS = 0x8D5  # CF PF AF ZF SF OF: the flags user mode may set freely

VECTOR_REGS = [f"%xmm{i}" for i in range(16)]

# Instruction families: register and memory forms (memory at %rsi/%rdi is
# 64-byte aligned; the index register %rbx holds 0, 2, 4 or 6).


def _names(text: str) -> list[str]:
    return text.split()


CASES: list[str] = []
for name in _names(
    "paddb paddw paddd paddq psubb psubw psubd psubq paddsb paddsw paddusb paddusw "
    "psubsb psubsw psubusb psubusw pmullw pmulhw pmulhuw pmuludq pmaddwd psadbw pavgb "
    "pavgw pminub pmaxub pminsw pmaxsw pcmpeqb pcmpeqw pcmpeqd pcmpgtb pcmpgtw pcmpgtd "
    "pand pandn por pxor andps andpd andnps andnpd orps orpd xorps xorpd packsswb "
    "packuswb packssdw punpcklbw punpcklwd punpckldq punpcklqdq punpckhbw punpckhwd "
    "punpckhdq punpckhqdq unpcklps unpckhps unpcklpd unpckhpd"
):
    CASES += [f"{name} %xmm3, %xmm5", f"{name} 32(%rsi,%rbx,8), %xmm12", f"{name} %xmm9, %xmm9"]
for name in _names("psrlw psrld psrlq psllw pslld psllq psraw psrad"):
    CASES += [f"{name} %xmm1, %xmm2", f"{name} (%rdi), %xmm11"]
    CASES += [f"{name} ${n}, %xmm{r}" for n, r in ((0, 4), (7, 5), (31, 13), (63, 6), (200, 7))]
for name in ("psrldq", "pslldq"):
    CASES += [f"{name} ${n}, %xmm{r}" for n, r in ((0, 1), (5, 2), (15, 10), (16, 3), (255, 4))]
for name in ("pshufd", "pshuflw", "pshufhw", "shufps", "shufpd"):
    CASES += [f"{name} $0x1b, %xmm1, %xmm2", f"{name} $0xe4, 16(%rsi), %xmm14"]
    CASES += [f"{name} $0x93, %xmm15, %xmm0"]
for name in ("movups", "movupd", "movdqu", "movaps", "movapd", "movdqa"):
    CASES += [f"{name} %xmm1, %xmm8", f"{name} 48(%rsi), %xmm3", f"{name} %xmm6, 64(%rdi)"]
for name in ("movups", "movupd", "movdqu"):
    CASES += [f"{name} 3(%rsi), %xmm4", f"{name} %xmm4, 7(%rdi,%rbx,4)"]
CASES += ["lddqu 5(%rsi), %xmm9", "movntdq %xmm2, (%rdi)", "movntps %xmm3, 16(%rdi)"]
CASES += ["movntpd %xmm13, 32(%rdi)"]
for name in ("movss", "movsd"):
    CASES += [f"{name} %xmm1, %xmm2", f"{name} 4(%rsi), %xmm3", f"{name} %xmm5, 9(%rdi)"]
for name in ("movlps", "movlpd", "movhps", "movhpd"):
    CASES += [f"{name} 8(%rsi), %xmm3", f"{name} %xmm7, 12(%rdi)"]
CASES += ["movhlps %xmm1, %xmm2", "movlhps %xmm10, %xmm3", "movlhps %xmm4, %xmm4"]
CASES += [
    "movd %eax, %xmm1",
    "movd %r9d, %xmm12",
    "movd 4(%rsi), %xmm2",
    "movq %rcx, %xmm3",
    "movq %r15, %xmm15",
    "movq 8(%rsi), %xmm6",
    "movd %xmm1, %eax",
    "movd %xmm12, %r10d",
    "movd %xmm2, 12(%rdi)",
    "movq %xmm3, %rdx",
    "movq %xmm13, %r11",
    "movq %xmm4, 16(%rdi)",
    "movq %xmm1, %xmm2",
    "movq 24(%rsi), %xmm7",
    ".byte 0x66, 0x0f, 0xd6, 0xca",  # movq %xmm1, %xmm2 (the store form)
    ".byte 0xf3, 0x0f, 0x11, 0xca",  # movss %xmm1, %xmm2 (the store form)
    ".byte 0xf2, 0x0f, 0x11, 0xca",  # movsd %xmm1, %xmm2 (the store form)
    ".byte 0x0f, 0x11, 0xca",  # movups %xmm1, %xmm2 (the store form)
    ".byte 0x66, 0x0f, 0x7f, 0xca",  # movdqa %xmm1, %xmm2 (the store form)
    ".byte 0x66, 0x48, 0x0f, 0x7e, 0x47, 0x10",  # movq %xmm0, 16(%rdi) (the 7e form)
    "movq %xmm9, 20(%rdi)",
    "pmovmskb %xmm3, %eax",
    "pmovmskb %xmm14, %r12d",
    "movnti %eax, 4(%rdi)",
    "movnti %r13, 8(%rdi)",
    "lfence",
    "mfence",
    "sfence",
    "prefetchnta (%rsi)",
    "prefetcht0 64(%rsi)",
    "prefetcht1 (%rdi)",
    "prefetcht2 8(%rdi)",
    "prefetchw (%rsi)",
    "clflush 64(%rdi)",
    "ldmxcsr (%rsi)",
    "stmxcsr 4(%rdi)",
    "xgetbv",
    "fxsave (%rdi)",
    "fxsave64 (%rdi)",
    "fxrstor (%rsi)",
    "fxrstor64 (%rsi)",
    "xsave (%rdi)",
    "xsave64 (%rdi)",
    "xsaveopt (%rdi)",
    "xsaveopt64 (%rdi)",
    "xrstor (%rsi)",
    "xrstor64 (%rsi)",
    "xsavec (%rdi)",
    "xsavec64 (%rdi)",
    "xrstor64 (%rsi) # of a compacted area",
    "xrstor (%rsi) # of a compacted area",
    "cmpxchg16b (%rdi)",
    "lock cmpxchg16b 16(%rdi)",
    "cmpxchg8b 8(%rdi)",
    "lock cmpxchg8b (%rdi)",
    "pxor %fs:(%rsi), %xmm2",
    "popcnt %rdi, %rax",
    "popcnt %ecx, %r9d",
    "popcnt %bx, %dx",
    "popcnt 8(%rsi), %r11",
    "popcnt 4(%rsi), %eax",
    "tzcnt %rdi, %rax",
    "tzcnt %r8d, %ecx",
    "tzcnt (%rsi), %rdx",
    "lzcnt %rdi, %rax",
    "lzcnt %r10w, %bx",
    "lzcnt 16(%rsi), %r12d",
    "fwait",
    "fninit",
]


class Assembled:
    """Every case's bytes, assembled once."""

    def __init__(self, workdir: Path) -> None:
        source = workdir / "cases.S"
        obj = workdir / "cases.o"
        flat = workdir / "cases.bin"
        lines = [".text"]
        for i, text in enumerate(CASES):
            lines += [f"start_{i}:", f"    {text}", f"end_{i}:"]
        source.write_text("\n".join(lines) + "\n")
        subprocess.run(["gcc", "-c", "-o", str(obj), str(source)], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
        symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True)
        where = {line.split()[2]: int(line.split()[0], 16) for line in symbols.stdout.splitlines()}
        data = flat.read_bytes()
        self.code = {
            text: data[where[f"start_{i}"] : where[f"end_{i}"]] for i, text in enumerate(CASES)
        }


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> Assembled:
    return Assembled(tmp_path_factory.mktemp("cases"))


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> NativeCpu:
    return NativeCpu(tmp_path_factory.mktemp("native"))


class Host:
    """The host's XCR0, MXCSR_MASK and XSAVE layout, read natively."""

    def __init__(self, native: NativeCpu) -> None:
        fx = _fx_image(random.Random(0))
        regs, image = native.run(b"\x0f\x01\xd0", [0] * REGISTER_COUNT, fx)  # xgetbv
        self.xcr0 = regs[0] | (regs[3] << 32)
        self.mxcsr_mask = int.from_bytes(image[28:32], "little")
        self.layout: dict[int, tuple[int, int]] = {}
        for bit in range(2, 10):
            if self.xcr0 & (1 << bit):
                query = [0] * REGISTER_COUNT
                query[0], query[2] = 0xD, bit  # cpuid leaf 0xD, subleaf = component
                regs, _ = native.run(b"\x0f\xa2", query, fx)
                self.layout[bit] = (regs[1], regs[0])  # (EBX offset, EAX size)


@pytest.fixture(scope="module")
def host(native: NativeCpu) -> Host:
    return Host(native)


def _fx_image(rng: random.Random, mxcsr_mask: int = 0xFFBF) -> bytes:
    """A random but loadable FXSAVE64 image: sane FCW, random stack and XMM."""
    image = bytearray(rng.randbytes(512))
    image[0:2] = (0x037F).to_bytes(2, "little")  # FCW: all exceptions masked
    image[2:4] = (rng.randrange(8) << 11).to_bytes(2, "little")  # FSW: only TOP
    image[4] = rng.randrange(256)  # abridged FTW
    image[5] = 0
    image[6:24] = bytes(18)  # FOP, FIP, FDP: not kept by every CPU (AMD)
    mxcsr = rng.getrandbits(16) & mxcsr_mask
    image[MXCSR : MXCSR + 8] = mxcsr.to_bytes(4, "little") + mxcsr_mask.to_bytes(4, "little")
    for i in range(8):  # the 6 bytes after each 80-bit register are reserved
        offset = 32 + 16 * i + 10
        image[offset : offset + 6] = bytes(6)
    image[LEGACY_END:] = bytes(512 - LEGACY_END)
    return bytes(image)


class Buffer:
    """A 64-byte aligned buffer the native instruction and the emulator both address."""

    def __init__(self) -> None:
        self._raw = ctypes.create_string_buffer(BUFFER_SIZE + 64)
        self.address = (ctypes.addressof(self._raw) + 63) & ~63
        self._view = memoryview((ctypes.c_char * BUFFER_SIZE).from_address(self.address)).cast("B")

    def fill(self, data: bytes) -> None:
        self._view[:] = data

    def read(self) -> bytes:
        return bytes(self._view)


def _prepare_memory(rng: random.Random, text: str, buffer: Buffer, host: Host) -> bytes:
    data = bytearray(rng.randbytes(BUFFER_SIZE))
    rsi, rdi = 256, 2048
    mask = host.mxcsr_mask
    if text.startswith("ldmxcsr"):
        data[rsi : rsi + 4] = (rng.getrandbits(16) & mask).to_bytes(4, "little")
    if "rstor" in text:  # a valid image at %rsi
        image = bytearray(_fx_image(rng, mask) + rng.randbytes(2560))
        # Header: XSTATE_BV a random subset of XCR0, XCOMP_BV and the rest 0.
        xstate_bv = rng.getrandbits(64) & host.xcr0
        xcomp_bv = (COMPACTED_FORMAT | host.xcr0) if "compacted" in text else 0
        image[XSTATE_BV : XSTATE_BV + 64] = (
            xstate_bv.to_bytes(8, "little") + xcomp_bv.to_bytes(8, "little") + bytes(48)
        )
        data[rsi : rsi + len(image)] = image
    if text.startswith("xsave"):  # a header the instruction partly keeps
        data[rdi + XSTATE_BV : rdi + XSTATE_BV + 64] = rng.randbytes(8) + bytes(56)
    if "cmpxchg" in text and rng.random() < 0.5:
        data[rdi : rdi + 32] = bytes(32)  # expected value (RDX:RAX = 0) matches
    buffer.fill(bytes(data))
    return bytes(data)


def _prepare_registers(rng: random.Random, text: str, buffer: Buffer) -> list[int]:
    regs = [rng.getrandbits(64) for _ in range(REGISTER_COUNT)]
    regs[RSI] = buffer.address + 256
    regs[RDI] = buffer.address + 2048
    regs[RBX] = 2 * rng.randrange(4)  # keeps 16-byte operands aligned
    regs[RSP] = 0
    regs[RFLAGS] = 0x202 | (rng.getrandbits(12) & ARITHMETIC_FLAGS)  # IF is on in user mode
    if "xsave" in text or "xrstor" in text:
        regs[0] = rng.choice((1, 2, 3, 5, 7, 0xFFFFFFFF) if "rstor" in text else (1, 2, 3, 7))
        regs[3] = 0
    if "cmpxchg" in text and rng.random() < 0.5:
        regs[0] = regs[3] = 0
    if text == "xgetbv":
        regs[2] = 0  # XCR0 (XCR1, XINUSE, is the host's private state)
    if "%fs:" in text:
        regs[RSI] = 256  # with the FS base at the buffer: the same bytes
    return regs


def _compare(
    text: str,
    trial: int,
    native_regs: list[int],
    native_fx: bytes,
    native_mem: bytes,
    cpu: PlainCpu,
) -> None:
    where = f"{text!r}, trial {trial}"
    for i in range(REGISTER_COUNT):
        if i != RSP:
            assert cpu.regs[i] == native_regs[i], f"{where}: register {i}"
    assert bytes(cpu.memory) == native_mem, f"{where}: memory"
    area = cpu.vector_state.area
    for start, end, what in ((0, 24, "x87 control"), (24, 32, "MXCSR"), (32, 160, "x87 stack")):
        assert area[start:end] == native_fx[start:end], f"{where}: {what}"
    for i in range(16):
        offset = 160 + 16 * i
        assert area[offset : offset + 16] == native_fx[offset : offset + 16], f"{where}: xmm{i}"


@pytest.mark.parametrize("text", CASES)
def test_emulated_instruction_matches_the_host(
    text: str, assembled: Assembled, native: NativeCpu, host: Host
) -> None:
    if ("xsave" in text or "xgetbv" in text or "xrstor" in text) and not host.xcr0 & 2:
        pytest.skip("the host has no XSAVE")
    if ("xsavec" in text or "compacted" in text) and "xsavec" not in host_cpu_flags():
        pytest.skip("the host CPU has no XSAVEC (the compacted format)")
    code = assembled.code[text]
    insn = decode(code + bytes(15))
    assert insn.length == len(code), f"{text}: decoded length {insn.length}, really {len(code)}"
    if not text.startswith(("lock", ".byte", "pxor %fs")):
        assert display_name(insn) == text.split()[0]
    buffer = Buffer()
    rng = random.Random(text)
    for trial in range(TRIALS):
        memory = _prepare_memory(rng, text, buffer, host)
        regs = _prepare_registers(rng, text, buffer)
        fx_in = _fx_image(rng, host.mxcsr_mask)
        area = bytearray(fx_in + bytes(4096 - 512))
        area[XSTATE_BV] = 0x3  # x87 and SSE in use; AVX (uppers zeroed) not
        cpu = PlainCpu(
            regs=[*regs[:RIP], native.code_address, regs[RFLAGS]],
            memory=bytearray(memory),
            memory_base=buffer.address,
            vector=VectorState(area, host.layout),
            xcr0=host.xcr0,
            fs_base=buffer.address if "%fs:" in text else 0,
        )
        if "%fs:" in text:
            native_regs, native_fx = _run_with_fs(native, code, regs, fx_in, buffer)
        else:
            native_regs, native_fx = native.run(code, regs, fx_in)
        execute(cpu, insn)
        _compare(text, trial, native_regs, native_fx, buffer.read(), cpu)


def _run_with_fs(
    native: NativeCpu, code: bytes, regs: list[int], fx_in: bytes, buffer: Buffer
) -> tuple[list[int], bytes]:
    # User space cannot move FS to our buffer safely (libc's TLS lives there), so
    # run the same instruction without the override, addressed absolutely.
    plain = code.replace(b"\x64", b"", 1)
    moved = list(regs)
    moved[RSI] = buffer.address + regs[RSI]
    out, image = native.run(plain, moved, fx_in)
    out[RSI] = regs[RSI]
    out[RIP] = native.code_address + len(code)
    return out, image
