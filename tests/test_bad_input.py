"""Every malformed input gets a clear one-line error and a non-zero exit, never a
traceback: through the real command line, and through the loader directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dksm.loader.elf import parse_elf
from dksm.loader.segment import LoaderError

from conftest import dksm
from elf_builder import PF_R, PF_W, Seg, make_elf

MIB = 1 << 20
CODE = b"\xf4" * 64  # hlt


def _good_segments() -> list[Seg]:
    return [Seg(0x100000, CODE), Seg(0x200000, b"\x01" * 100, 0x2000, PF_R | PF_W)]


BAD_IMAGES: dict[str, tuple[bytes, str]] = {
    "not_elf": (b"#!/bin/sh\necho hi\n" * 10, "not an ELF file"),
    "empty": (b"", "not an ELF file"),
    "truncated_header": (make_elf(_good_segments())[:40], "truncated ELF header"),
    "truncated_phdrs": (make_elf(_good_segments())[:100], "truncated"),
    "truncated_data": (make_elf(_good_segments())[:0x1010], "truncated"),
    "elf32": (make_elf(_good_segments(), elf_class=1), "32-bit"),
    "big_endian": (make_elf(_good_segments(), endian=2), "big-endian"),
    "wrong_machine": (make_elf(_good_segments(), machine=183), "not x86-64"),
    "bad_phentsize": (make_elf(_good_segments(), phentsize=32), "program header size"),
    "no_load": (make_elf([]), "program headers"),
    "outside_ram": (
        make_elf([Seg(0x100000, CODE), Seg(15 * MIB, b"x", 2 * MIB)]),
        "beyond guest RAM of 16 MiB",
    ),
    "overlap": (make_elf([Seg(0x100000, CODE * 100), Seg(0x101000, CODE)]), "overlap"),
    "boot_structures": (make_elf([Seg(0x7000, CODE)], entry=0x7000), "boot structures"),
    "entry_low": (make_elf([Seg(0x100000, CODE)], entry=0x8000), "below 1 MiB"),
    "entry_outside": (make_elf([Seg(0x100000, CODE)], entry=0x300000), "outside every segment"),
    "filesz_gt_memsz": (make_elf([Seg(0x100000, CODE, memsz=10)]), "exceeds memory size"),
    "huge_memsz": (make_elf([Seg(0x100000, CODE, memsz=1 << 62)]), "beyond guest RAM"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_loader_names_the_problem(case: str) -> None:
    image, message = BAD_IMAGES[case]
    with pytest.raises(LoaderError, match=message):
        parse_elf(image, 16 * MIB, "img")


def _assert_clean_error(result: object, needle: str) -> None:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 1, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dksm: error: ")
    assert needle in lines[0]


@pytest.mark.parametrize(
    "case",
    [
        "not_elf",
        "truncated_data",
        "elf32",
        "big_endian",
        "outside_ram",
        "overlap",
        "entry_low",
        "huge_memsz",
    ],
)
def test_cli_reports_bad_image_in_one_line(case: str, tmp_path: Path) -> None:
    image, message = BAD_IMAGES[case]
    path = tmp_path / f"{case}.elf"
    path.write_bytes(image)
    _assert_clean_error(dksm("run", "--kernel", str(path), "--mem-mib", "16"), message)


def test_missing_image_file(tmp_path: Path) -> None:
    _assert_clean_error(dksm("run", "--kernel", str(tmp_path / "nope.elf")), "cannot read")


@pytest.mark.parametrize(
    ("mem", "needle"),
    [("1", "too small"), ("0", "too small"), ("-5", "too small"), ("1000000", "too large")],
)
def test_memory_size_checked(mem: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "ok.elf"
    path.write_bytes(make_elf(_good_segments()))
    _assert_clean_error(dksm("run", "--kernel", str(path), "--mem-mib", mem), needle)


def test_command_line_too_long(tmp_path: Path) -> None:
    path = tmp_path / "ok.elf"
    path.write_bytes(make_elf(_good_segments()))
    result = dksm("run", "--kernel", str(path), "--boot-args", "x" * 5000)
    _assert_clean_error(result, "command line is 5000 bytes")


@pytest.mark.parametrize("count", ["0", "33"])
def test_vcpu_count_outside_firecrackers_range_refused(tmp_path: Path, count: str) -> None:
    path = tmp_path / "ok.elf"
    path.write_bytes(make_elf(_good_segments()))
    result = dksm("run", "--kernel", str(path), "--vcpus", count)
    _assert_clean_error(result, f"vcpu_count must be 1 to 32, not {count}")


CONFIGS: dict[str, tuple[str, str]] = {
    "not_json": ("{boot-source: nope", "not valid JSON"),
    "not_object": ("[1, 2]", "must be a JSON object"),
    "no_boot_source": (
        '{"machine-config": {"vcpu_count": 1, "mem_size_mib": 16}}',
        "lacks the required field 'boot-source'",
    ),
    "no_kernel": ('{"boot-source": {"boot_args": "x"}}', "'kernel_image_path'"),
    "mem_not_int": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"machine-config": {"vcpu_count": 1, "mem_size_mib": "lots"}}',
        "mem_size_mib must be int",
    ),
    "drives": (
        '{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "root"}]}',
        "drives[0] lacks the required field 'path_on_host'",
    ),
    "network": (
        '{"boot-source": {"kernel_image_path": "k"}, "network-interfaces": [{"iface_id": "eth0"}]}',
        "network-interfaces[0] lacks the required field 'host_dev_name'",
    ),
    "too_many_vcpus": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"machine-config": {"vcpu_count": 64, "mem_size_mib": 16}}',
        "vcpu_count must be 1 to 32, not 64",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_file(case: str, tmp_path: Path) -> None:
    text, needle = CONFIGS[case]
    path = tmp_path / "vm.json"
    path.write_text(text)
    _assert_clean_error(dksm("run", "--config-file", str(path)), needle)


def test_config_file_missing(tmp_path: Path) -> None:
    _assert_clean_error(dksm("run", "--config-file", str(tmp_path / "none.json")), "cannot read")


def test_valid_config_parses(tmp_path: Path) -> None:
    from dksm.vmm.config import from_firecracker_json

    path = tmp_path / "vm.json"
    path.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": "/k", "boot_args": "a=1", "initrd_path": None},
                "drives": [],
                "network-interfaces": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 32, "smt": False},
            }
        )
    )
    config = from_firecracker_json(str(path))
    assert (config.kernel_path, config.boot_args, config.mem_mib) == ("/k", "a=1", 32)
