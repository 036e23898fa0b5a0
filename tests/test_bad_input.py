"""Every malformed input gets a clear one-line error and a non-zero exit, never a
traceback: through the real command line, and through the loader directly."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from dksm.loader.elf import PT_LOAD, parse_elf
from dksm.loader.segment import LoaderError

from conftest import dksm, requires_kvm
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


def test_loader_checks_every_header_before_copying_bytes() -> None:
    """Found by the property tests: 200 program headers naming the same 256 KiB of
    the file made the loader copy 50 MiB before it found the entry point outside
    them all.  Now a refused image costs what its checks cost."""
    import struct
    import tracemalloc

    count, blob = 200, b"\xf4" * (256 << 10)
    image = bytearray(make_elf([Seg(0x100000, b"")] * count, entry=0x1000_0000))
    for i in range(count):  # every header's file bytes: the one blob at the end
        addr = 0x100000 + i * len(blob)
        phdr = (PT_LOAD, PF_R, len(image), addr, addr, len(blob), len(blob), 0x1000)
        struct.pack_into("<IIQQQQQQ", image, 64 + 56 * i, *phdr)
    image += blob
    tracemalloc.start()
    try:
        with pytest.raises(LoaderError, match="lies outside every segment"):
            parse_elf(bytes(image), 128 * MIB, "img")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, f"{peak} bytes allocated to refuse a {len(image)}-byte image"


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
    "unknown_field": (
        '{"boot-source": {"kernel_image_path": "k"}, "machine-config": '
        '{"vcpu_count": 1, "mem_size_mib": 16, "ht_enabled": false}}',
        "machine-config.ht_enabled: unknown field",
    ),
    "duplicate_key": (
        '{"boot-source": {"kernel_image_path": "k"}, "boot-source": {"kernel_image_path": "j"}}',
        "the field 'boot-source' is given twice",
    ),
    "deep": ("[" * 100000 + "]" * 100000, "nested too deeply"),
    "smt": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"machine-config": {"vcpu_count": 2, "mem_size_mib": 16, "smt": true}}',
        "machine-config.smt: true is not supported",
    ),
    "logger": (
        '{"boot-source": {"kernel_image_path": "k"}, "logger": {"log_path": "/tmp/x"}}',
        "logger: the log file is written by 'dksm vmm'",
    ),
    "no_boot_source": (
        '{"machine-config": {"vcpu_count": 1, "mem_size_mib": 16}}',
        "boot-source: required field is missing",
    ),
    "no_kernel": (
        '{"boot-source": {"boot_args": "x"}}',
        "boot-source.kernel_image_path: required field is missing",
    ),
    "mem_not_int": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"machine-config": {"vcpu_count": 1, "mem_size_mib": "lots"}}',
        "machine-config.mem_size_mib: Input should be a valid integer",
    ),
    "drives": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"drives": [{"drive_id": "root", "is_root_device": true}]}',
        "drives: block devices (virtio-blk) are not supported yet",
    ),
    "network": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}',
        "network-interfaces: network devices (virtio-net) are not supported yet",
    ),
    "too_many_vcpus": (
        '{"boot-source": {"kernel_image_path": "k"}, '
        '"machine-config": {"vcpu_count": 64, "mem_size_mib": 16}}',
        "machine-config.vcpu_count: Input should be less than or equal to 32",
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
    config = from_firecracker_json(str(path)).vm
    assert (config.kernel_path, config.boot_args, config.mem_mib) == ("/k", "a=1", 32)


# -- files that must be regular and of bounded size -------------------------------

GIB = 1 << 30
HELLO_CONFIG = {
    "boot-source": {"kernel_image_path": "hello"},
    "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
}


@pytest.fixture
def special_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Files that must never be read whole, with what the error says about each."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as f:
        f.truncate(8 * GIB)  # costs no disk: a hole
    return {
        "dev_zero": ("/dev/zero", "is a character device, not a regular file"),
        "dev_urandom": ("/dev/urandom", "is a character device, not a regular file"),
        "fifo": (str(fifo), "is a FIFO, not a regular file"),
        "directory": (str(tmp_path), "is a directory, not a regular file"),
        "sparse_8gib": (str(sparse), "is 8589934592 bytes, more than"),
    }


SPECIAL = ["dev_zero", "dev_urandom", "fifo", "directory", "sparse_8gib"]


def _within_timeout(*args: str) -> object:
    """The command with a --timeout of its own and a deadline it must meet: a read
    that blocks or takes a whole device into memory fails the test, not the run."""
    return dksm(*args, timeout=20)


@pytest.mark.parametrize("case", SPECIAL)
def test_special_file_as_kernel(case: str, special_files: dict[str, tuple[str, str]]) -> None:
    path, needle = special_files[case]
    result = _within_timeout("run", "--kernel", path, "--mem-mib", "16", "--timeout", "5")
    _assert_clean_error(result, f"kernel image {path} {needle}")


@pytest.mark.parametrize("case", SPECIAL)
def test_special_file_as_initrd(case: str, special_files: dict[str, tuple[str, str]]) -> None:
    path, needle = special_files[case]
    result = _within_timeout(
        "run", "--kernel", "hello", "--initrd", path, "--mem-mib", "16", "--timeout", "5"
    )
    _assert_clean_error(result, f"initrd {path} {needle}")


@pytest.mark.parametrize("case", SPECIAL)
def test_special_file_as_config(case: str, special_files: dict[str, tuple[str, str]]) -> None:
    path, needle = special_files[case]
    result = _within_timeout("run", "--config-file", path, "--timeout", "5")
    _assert_clean_error(result, f"config file {path} {needle}")


def test_kernel_larger_than_guest_ram_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.elf"
    image = make_elf(_good_segments())
    path.write_bytes(image + b"\0" * (16 * MIB + 1 - len(image)))
    result = dksm("run", "--kernel", str(path), "--mem-mib", "16")
    _assert_clean_error(result, "16777217 bytes, more than guest RAM of 16 MiB")


def test_config_file_over_one_mib_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(HELLO_CONFIG) + " " * MIB)
    _assert_clean_error(dksm("run", "--config-file", str(path)), "more than the 1 MiB limit")


# -- config files that would break json ------------------------------------------


def _write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vm.json"
    path.write_text(text, errors="surrogatepass")
    return str(path)


def test_config_nested_2000_deep(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "[" * 2000 + "]" * 2000)
    _assert_clean_error(
        dksm("run", "--config-file", path), "JSON nested too deeply (more than 64 levels"
    )


def test_config_nesting_inside_strings_does_not_count(tmp_path: Path) -> None:
    from dksm.vmm.config import from_firecracker_json

    doc = {
        **HELLO_CONFIG,
        "boot-source": {"kernel_image_path": "hello", "boot_args": "[" * 2000 + "{" * 2000},
    }
    config = from_firecracker_json(_write_config(tmp_path, json.dumps(doc))).vm
    assert config.boot_args.startswith("[[[")


def test_config_5000_digit_memory_size(tmp_path: Path) -> None:
    text = json.dumps(HELLO_CONFIG).replace('"mem_size_mib": 16', '"mem_size_mib":\n' + "9" * 5000)
    result = dksm("run", "--config-file", _write_config(tmp_path, text))
    _assert_clean_error(result, "a number of 5000 digits at line 2; at most 20 are allowed")


def test_config_nan_is_not_json(tmp_path: Path) -> None:
    text = json.dumps(HELLO_CONFIG).replace('"mem_size_mib": 16', '"mem_size_mib": NaN')
    result = dksm("run", "--config-file", _write_config(tmp_path, text))
    _assert_clean_error(result, "not valid JSON: NaN is not JSON")


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_bytes(b'{"boot-source": {"kernel_image_path": "\xff"}}')
    _assert_clean_error(dksm("run", "--config-file", str(path)), "is not UTF-8 text")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("kernel_image_path", "a\0b", "kernel_image_path path 'a\\x00b' contains a NUL"),
        ("kernel_image_path", "k\ud800", "which no file name can hold"),
        ("kernel_image_path", "", "boot-source.kernel_image_path path is empty"),
        ("initrd_path", "i\0", "boot-source.initrd_path path 'i\\x00' contains a NUL"),
        ("initrd_path", "\udfff", "which no file name can hold"),
    ],
)
def test_config_paths_checked(field: str, value: str, needle: str, tmp_path: Path) -> None:
    doc = {**HELLO_CONFIG, "boot-source": {"kernel_image_path": "hello", field: value}}
    result = dksm("run", "--config-file", _write_config(tmp_path, json.dumps(doc)))
    _assert_clean_error(result, needle)


# -- paths on the command line ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--config-file", ""], "config file path is empty"),
        (["--kernel", ""], "kernel image path is empty"),
        (["--kernel", "hello", "--initrd", ""], "initrd path is empty"),
        (["--kernel", "hello", "--serial-out", ""], "serial output path is empty"),
        (["--kernel", "hello", "--info-file", ""], "info file path is empty"),
    ],
)
def test_empty_paths(flags: list[str], needle: str) -> None:
    _assert_clean_error(dksm("run", *flags), needle)


def test_path_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "new\nline.elf")
    _assert_clean_error(dksm("run", "--kernel", missing), "new\\x0aline.elf: No such file")


def test_path_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 name a file like any other (Python carries them as
    surrogate escapes); only what no file name can hold is refused."""
    missing = os.fsdecode(bytes(tmp_path) + b"/\xff.elf")
    _assert_clean_error(dksm("run", "--kernel", missing), "No such file or directory")


def test_serial_output_fifo_without_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    result = _within_timeout("run", "--kernel", "hello", "--serial-out", str(fifo))
    _assert_clean_error(result, "a FIFO that no process reads")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_timeout_must_be_positive_and_finite(value: str) -> None:
    result = dksm("run", "--kernel", "hello", f"--timeout={value}")
    _assert_clean_error(result, f"--timeout must be a positive number of seconds, not {value}")


# -- outputs that fail once the VM exists ------------------------------------------


@requires_kvm
@pytest.mark.parametrize(
    ("where", "needle"),
    [("missing/info.json", "No such file or directory"), (".", "Is a directory")],
)
def test_info_file_unwritable(where: str, needle: str, tmp_path: Path) -> None:
    target = tmp_path / where
    result = dksm("run", "--kernel", "hello", "--info-file", str(target), "--timeout", "10")
    _assert_clean_error(result, f"cannot write info file {target}: {needle}")
    assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"


@requires_kvm
def test_info_file_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "info.json"
    result = dksm("run", "--kernel", "hello", "--info-file", str(target), "--dedup", "none")
    assert result.returncode == 0, result.stderr
    info = json.loads(target.read_text())
    assert info["kernel"].endswith("hello.elf") and info["dedup"] == "none"
    assert [p.name for p in tmp_path.iterdir()] == ["info.json"]


@requires_kvm
def test_serial_output_on_a_full_device(tmp_path: Path) -> None:
    result = _within_timeout("run", "--kernel", "hello", "--serial-out", "/dev/full")
    _assert_clean_error(result, "host I/O error: cannot write the console output: No space left")


def test_console_write_error_ends_the_vm_once() -> None:
    """The device alone: a sink that fails hands its first error to the VM's
    callback, later bytes are dropped, and the guest's UART keeps working."""
    from dksm.devices.serial import DATA, LSR, LSR_THR_EMPTY, GuardedSink, Serial

    class FullDisk:
        writes = 0

        def write(self, data: bytes, /) -> int:
            self.writes += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    disk = FullDisk()
    errors: list[OSError] = []
    guard = GuardedSink(disk)
    guard.on_error = errors.append
    uart = Serial(guard)
    for byte in b"hello":
        uart.write(DATA, 1, byte)
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert disk.writes == 1
    assert uart.read(LSR, 1) & LSR_THR_EMPTY


def test_console_write_error_without_a_vm_is_raised() -> None:
    from dksm.devices.serial import GuardedSink

    class Closed:
        def write(self, data: bytes, /) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        GuardedSink(Closed()).write(b"x")


def test_pool_root_off_tmpfs_is_refused(tmp_path: Path) -> None:
    """A pool on disk would write guest code to disk at every load: --pool-root names
    a directory on tmpfs or is refused."""
    root = tmp_path / "pools"
    for command in (("run", "--kernel", "hello"), ("pool", "stats")):
        result = dksm(*command, "--pool-root", str(root))
        _assert_clean_error(result, f"the pool root {root} is not on tmpfs")
    assert not root.exists()
