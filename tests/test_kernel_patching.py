"""The Linux kernel's patch sites, read from its own sections, and copied pages
explained by them: checked on the real Debian cloud kernel (fetched once)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from dksm.analyze import kernel_patching as kp
from dksm.guests import linux
from dksm.loader.elf import load_elf
from dksm.memory.page_states import PageState, page_states

PAGE = 4096


@pytest.fixture(scope="module")
def kernel(linux_cache: Path) -> tuple[kp.KernelLayout, dict[int, bytes]]:
    path = linux_cache / "linux" / linux.VMLINUX
    image = load_elf(str(path), 256 << 20)
    code = image.segments[0]
    pages = {
        code.guest_addr + offset: code.data[offset : offset + PAGE]
        for offset in range(0, len(code.data) - PAGE, PAGE)
    }
    return kp.kernel_layout(path.read_bytes()), pages


def _byte(pages: dict[int, bytes], address: int) -> int:
    return pages[address & ~(PAGE - 1)][address % PAGE]


def test_patch_sites_point_at_the_instructions_they_patch(
    kernel: tuple[kp.KernelLayout, dict[int, bytes]],
) -> None:
    layout, pages = kernel
    text_start, text_end = layout.text
    expected_first_bytes = {
        kp.SMP_LOCKS: {0xF0},  # lock prefix
        kp.RETURN_THUNKS: {0xE9},  # jmp __x86_return_thunk
        kp.PARAVIRT: {0xFF},  # call *pv_ops[...]
        kp.FTRACE: {0xE8},  # call __fentry__, as built
    }
    for name, allowed in expected_first_bytes.items():
        sites = [s for s in layout.sites[name] if text_start <= s[0] < text_end - 8]
        assert len(sites) > 1000, name
        wrong = [hex(s) for s, _ in sites if _byte(pages, s) not in allowed]
        assert len(wrong) <= len(sites) // 100, f"{name}: {wrong[:5]}"
    assert len(layout.sites[kp.ALTERNATIVES]) > 1000
    assert len(layout.sites[kp.RETPOLINES]) > 1000


def test_copied_pages_are_explained_by_what_changed(
    kernel: tuple[kp.KernelLayout, dict[int, bytes]],
) -> None:
    layout, pages = kernel
    lock = layout.sites[kp.SMP_LOCKS][len(layout.sites[kp.SMP_LOCKS]) // 2][0]
    page = lock & ~(PAGE - 1)
    before = pages[page]
    after = bytearray(before)
    after[lock - page] = 0x3E  # what the kernel writes on a uniprocessor: a DS prefix
    change = kp.explain_page(layout, page, before, bytes(after))
    assert change.mechanisms == {kp.SMP_LOCKS: 1}
    assert kp.explain_page(layout, page, before, before).primary == kp.UNCHANGED
    rodata = layout.rodata[0] + 16 * PAGE
    data_after = bytearray(pages[rodata])
    data_after[100:108] = b"\x01" * 8
    assert kp.explain_page(layout, rodata, pages[rodata], bytes(data_after)).primary == kp.RODATA
    report = kp.explain_pages(layout, [(page, before, bytes(after)), (page, before, before)])
    assert report.to_json()["by_primary"] == {kp.SMP_LOCKS: 1, kp.UNCHANGED: 1}


def test_page_states_tell_untouched_read_and_copied_pages_apart(tmp_path: Path) -> None:
    # 64 pages, so that the kernel's fault-around (up to 64 KiB near a read) cannot
    # reach the first page from the one read.
    backing = tmp_path / "pages"
    backing.write_bytes(b"\x11" * 64 * PAGE)
    with open(backing, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 64 * PAGE, flags=mmap.MAP_PRIVATE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    _ = mapping[32 * PAGE]  # read: the file's page
    mapping[63 * PAGE] = 0x22  # written: a private copy
    states = page_states(os.getpid(), address, 64)
    assert (states[0], states[32], states[63]) == (
        PageState.ABSENT,
        PageState.FILE,
        PageState.ANONYMOUS,
    )
