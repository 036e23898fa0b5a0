"""Property tests of the two parsers that read untrusted files: the ELF loader and the
Firecracker config reader.  On any input, each either returns a value that obeys its
own rules or raises dksm's error for it (a ``DksmError``), never anything else, and
the loader never allocates more than what it returns.

The default (``ci``) profile runs a short search; a long one is
``DKSM_HYPOTHESIS_PROFILE=long pytest tests/test_parser_properties.py``.
"""

from __future__ import annotations

import itertools
import json
import struct
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dksm.arch import layout
from dksm.error import DksmError
from dksm.guests import catalog, resolve_image_path
from dksm.loader.elf import load_elf, parse_elf
from dksm.loader.segment import KernelImage
from dksm.vmm.config import ConfigError, VmConfig, from_firecracker_json

from elf_builder import PF_R, PF_W, PF_X, Seg, make_elf

MIB = 1 << 20
U64 = (1 << 64) - 1

# -- the ELF loader -------------------------------------------------------------------

MEM_SIZES = st.sampled_from([2 * MIB, 16 * MIB, 128 * MIB]) | st.integers(
    layout.MIN_MEM_SIZE, layout.MAX_MEM_SIZE
)

# Interesting values for a header field: edges of every width, and sizes near RAM's.
EDGES = st.sampled_from(
    [0, 1, 2, 0x38, 0x40, 0xFFF, 0x1000, 0x100000, 0x7000, 16 * MIB, 128 * MIB]
    + [(1 << bits) - d for bits in (8, 16, 31, 32, 63) for d in (0, 1)]
    + [U64]
)

# (offset, size) of every Elf64_Ehdr field, and of every Elf64_Phdr field from its
# entry's start.
EHDR_FIELDS = [(4, 1), (5, 1), (6, 1), (16, 2), (18, 2), (20, 4), (24, 8), (32, 8), (40, 8)]
EHDR_FIELDS += [(48, 4), (52, 2), (54, 2), (56, 2), (58, 2), (60, 2), (62, 2)]
PHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8)]


@dataclass(frozen=True)
class ElfInput:
    """Generated loader input.  Its repr is how it was made, not its bytes: a failing
    example mutated from a 570 KiB guest reads as a few lines."""

    recipe: str
    data: bytes = field(repr=False)


SHIPPED = {name: path.read_bytes() for name, path in catalog().items()}
SHIPPED_IMAGES = st.sampled_from(sorted(SHIPPED)).map(lambda n: ElfInput(n, SHIPPED[n]))

FLAGS = st.sampled_from([PF_R, PF_R | PF_X, PF_R | PF_W, PF_R | PF_W | PF_X, 0])
ADDRESSES = st.integers(0, 64 * MIB) | EDGES | st.integers(0, U64)


@st.composite
def _built(draw: st.DrawFn) -> ElfInput:
    """Images from elf_builder: mostly laid out as a linker would (segments in order
    from 1 MiB, the entry in the first), sometimes anything anywhere."""
    segments = []
    addr = layout.HIMEM_START
    for i in range(draw(st.integers(0, 6))):
        length = draw(st.integers(0, 12_000))
        wild = draw(st.integers(0, 9)) == 0  # one segment in ten anything, anywhere
        memsz = draw(ADDRESSES if wild else st.none() | st.integers(length, length + 3 * 4096))
        addr += draw(st.sampled_from([0, 4096]) | st.integers(0, 8192))
        paddr = draw(ADDRESSES) if wild else addr & U64
        # Each segment its own fill byte, so that the bytes a segment returns can be
        # traced to the file.
        segments.append(Seg(paddr, bytes([i + 1]) * length, memsz, draw(FLAGS)))
        addr = paddr + (length if memsz is None else memsz)
    first = segments[0].paddr if segments else layout.HIMEM_START
    entry = draw(st.none() | st.integers(first, first + 64).map(lambda e: e & U64) | ADDRESSES)
    recipe = ", ".join(
        f"Seg({s.paddr:#x}, {len(s.data)} bytes, memsz={s.memsz}, flags={s.flags})"
        for s in segments
    )
    return ElfInput(f"make_elf([{recipe}], entry={entry})", make_elf(segments, entry))


@st.composite
def _mutated(draw: st.DrawFn, images: st.SearchStrategy[ElfInput]) -> ElfInput:
    """A valid image with a few of its header fields or bytes changed, or cut short."""
    base = draw(images)
    data = bytearray(base.data)
    edits: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["ehdr", "phdr", "phdr", "byte", "cut", "copy"]))
        phoff, phnum = 0, 0
        if len(data) >= 64:
            (phoff,), (phnum,) = (
                struct.unpack_from("<Q", data, 32),
                struct.unpack_from("<H", data, 56),
            )
        if how in ("ehdr", "phdr"):
            if how == "ehdr":
                offset, size = draw(st.sampled_from(EHDR_FIELDS))
            else:
                where, size = draw(st.sampled_from(PHDR_FIELDS))
                offset = phoff + 56 * draw(st.integers(0, max(phnum - 1, 0))) + where
            if offset + size > len(data):
                continue
            value = draw(EDGES | st.integers(0, U64)) & ((1 << (8 * size)) - 1)
            data[offset : offset + size] = value.to_bytes(size, "little")
            edits.append(f"{size} bytes at {offset:#x} = {value:#x}")
        elif how == "byte" and data:
            offset, value = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 255))
            data[offset] = value
            edits.append(f"byte at {offset:#x} = {value:#x}")
        elif how == "cut":
            at = draw(st.integers(0, len(data)))
            del data[at:]
            edits.append(f"cut at {at:#x}")
        elif how == "copy" and phnum >= 2 and phoff + 56 * phnum <= len(data):
            # One program header over another: the same segment twice, an overlap.
            i, j = draw(st.integers(0, phnum - 1)), draw(st.integers(0, phnum - 1))
            source = phoff + 56 * i
            data[phoff + 56 * j : phoff + 56 * (j + 1)] = data[source : source + 56]
            edits.append(f"program header {i} copied over {j}")
    return ElfInput(f"{base.recipe}, then {'; '.join(edits) or 'unchanged'}", bytes(data))


ELF_INPUTS = (
    st.binary(max_size=512).map(lambda b: ElfInput(repr(b), b))
    | st.binary(max_size=512).map(lambda b: ElfInput(repr(b"\x7fELF" + b), b"\x7fELF" + b))
    | _built()
    | _mutated(_built())
    | _mutated(SHIPPED_IMAGES)
)


def _verdict(result: object) -> str:
    """What a parser made of an input, for ``--hypothesis-show-statistics``: which
    refusals the search reaches, and how often it gets through to an accepted one."""
    if isinstance(result, DksmError):
        words = str(result).split(": ")[-1].split()
        return "refused: " + " ".join(w for w in words[:4] if not any(c.isdigit() for c in w))
    return "accepted"


def _parse_tracing(data: bytes, mem_size: int) -> tuple[KernelImage | DksmError, int]:
    """Parse, and measure the peak of what parsing allocated."""
    tracemalloc.start()
    try:
        result: KernelImage | DksmError = parse_elf(data, mem_size, "fuzzed")
    except DksmError as exc:
        result = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, peak


def _assert_sound(image: KernelImage, data: bytes, mem_size: int) -> None:
    """What the builder relies on in an image the loader accepted."""
    segments = image.segments
    assert segments
    assert all(a.end <= b.guest_addr for a, b in itertools.pairwise(segments))
    for s in segments:
        assert layout.BOOT_STRUCTURES_END <= s.guest_addr < s.end <= mem_size
        assert s.mem_size > 0 and len(s.data) <= s.mem_size
        assert s.data in data
    assert image.entry >= layout.HIMEM_START
    assert any(s.guest_addr <= image.entry < s.end for s in segments)


# What the loader may allocate beyond what it returns: the small objects of its work.
PARSE_OVERHEAD = 64 << 10


@given(elf=ELF_INPUTS, mem_size=MEM_SIZES)
def test_elf_parser_raises_only_loader_errors_and_allocates_what_it_returns(
    elf: ElfInput, mem_size: int
) -> None:
    result, peak = _parse_tracing(elf.data, mem_size)
    event(_verdict(result))
    kept = 0
    if isinstance(result, KernelImage):
        _assert_sound(result, elf.data, mem_size)
        kept = sum(len(s.data) for s in result.segments)
    assert peak <= kept + PARSE_OVERHEAD, f"parsing allocated {peak} bytes to return {kept}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzzed")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(elf=ELF_INPUTS, mem_size=MEM_SIZES)
def test_elf_file_loader_raises_only_dksm_errors(
    elf: ElfInput, mem_size: int, scratch: Path
) -> None:
    path = scratch / "image.elf"
    path.write_bytes(elf.data)
    try:
        image = load_elf(str(path), mem_size)
    except DksmError:
        return
    _assert_sound(image, elf.data, mem_size)


def test_shipped_images_parse() -> None:
    """The mutations above start from images the loader accepts."""
    for data in SHIPPED.values():
        _assert_sound(parse_elf(data, 16 * MIB), data, 16 * MIB)


# -- the Firecracker config reader ------------------------------------------------------

CHARACTERS = st.characters() | st.characters(categories=["Cs"])  # with lone surrogates
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats()
    | st.text(CHARACTERS, max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)
# What any JSON parser takes: finite numbers, integers within 64 bits.
PLAIN_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)
KERNEL_PATHS = st.sampled_from(["hello", "/k", "", "a\0b", "\ud800", "x" * 5000]) | JSON_VALUES


def _firecracker_shaped() -> st.SearchStrategy[dict[str, Any]]:
    """Documents with Firecracker's sections, each with a plausible or a wrong value."""
    boot = st.fixed_dictionaries(
        {"kernel_image_path": KERNEL_PATHS},
        optional={
            "boot_args": st.none() | st.text(max_size=30) | JSON_VALUES,
            "initrd_path": st.none() | KERNEL_PATHS,
        },
    )
    sizes = st.integers(-5, 5000) | EDGES | st.integers(-5, 1 << 64) | JSON_VALUES
    machine = st.fixed_dictionaries(
        {},
        optional={
            "vcpu_count": sizes,
            "mem_size_mib": sizes,
            "smt": st.booleans() | JSON_VALUES,
        },
    )
    # Mostly the right shape, so that the search gets past the first checks.
    return st.fixed_dictionaries(
        {"boot-source": boot | boot | boot | JSON_VALUES},
        optional={
            "machine-config": machine | machine | JSON_VALUES,
            "drives": st.just([]) | JSON_VALUES,
            "network-interfaces": st.just([]) | JSON_VALUES,
            "vsock": st.none() | JSON_VALUES,
            "balloon": st.none() | JSON_VALUES,
            "logger": JSON_VALUES,
        },
    )


VALID_CONFIG = json.dumps(
    {
        "boot-source": {"kernel_image_path": "/k", "boot_args": "a=1", "initrd_path": None},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    },
    indent=1,
)
JSON_CHARACTERS = st.sampled_from(list('{}[]",:0123456789-+.eE\\ntrufalse \n')) | CHARACTERS


@st.composite
def _mutated_text(draw: st.DrawFn) -> str:
    """The valid config with characters inserted, deleted or replaced, or wrapped in
    nesting of any depth."""
    text = VALID_CONFIG
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "delete", "replace", "nest", "digits"]))
        if how == "insert":
            text = text[:at] + draw(st.text(JSON_CHARACTERS, max_size=4)) + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        elif how == "replace":
            text = text[:at] + draw(JSON_CHARACTERS) + text[at + 1 :]
        elif how == "nest":
            depth = draw(st.integers(1, 3000))
            opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
            text = text[:at] + opener * depth + text[at:] + closer * draw(st.integers(0, depth))
        else:
            text = text[:at] + "9" * draw(st.integers(1, 6000)) + text[at:]
    return text


def _documents() -> Iterator[st.SearchStrategy[bytes]]:
    yield JSON_VALUES.map(lambda v: json.dumps(v).encode())
    yield _firecracker_shaped().map(lambda v: json.dumps(v).encode())
    yield _mutated_text().map(lambda t: t.encode("utf-8", "surrogatepass"))
    yield st.text(JSON_CHARACTERS, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    yield st.binary(max_size=200)


CONFIG_INPUTS = st.one_of(*_documents())


def _read(scratch: Path, document: bytes) -> VmConfig | ConfigError:
    path = scratch / "vm.json"
    path.write_bytes(document)
    try:
        return from_firecracker_json(str(path)).vm
    except ConfigError as exc:
        return exc


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=CONFIG_INPUTS)
@example(document=b"[" * 2000 + b"]" * 2000)
@example(document=b'{"machine-config": {"mem_size_mib": ' + b"9" * 5000 + b"}}")
@example(document=b'{"machine-config": {"mem_size_mib": NaN}}')
def test_config_reader_raises_only_config_errors(document: bytes, scratch: Path) -> None:
    result = _read(scratch, document)
    event(_verdict(result))
    if isinstance(result, ConfigError):
        # One problem per line (a document may have several), never a line broken.
        lines = result.lines()
        assert lines and all("\n" not in line for line in lines)
        return
    # Accepted: it is what the document says, and a config the builder may use.
    doc = json.loads(document)
    assert result.kernel_path == resolve_image_path(doc["boot-source"]["kernel_image_path"])
    machine = doc.get("machine-config") or {}
    assert result.mem_mib == machine.get("mem_size_mib", 128)
    result.validate()


FILE_NAMES = st.text(
    st.characters(exclude_characters="\0", exclude_categories=["Cs"]), min_size=1, max_size=30
)


@st.composite
def _acceptable(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed configs with in-range values, in every optional arrangement."""
    boot: dict[str, Any] = {"kernel_image_path": draw(FILE_NAMES)}
    if draw(st.booleans()):
        boot["boot_args"] = draw(st.none() | st.text(max_size=100))
    if draw(st.booleans()):
        boot["initrd_path"] = draw(st.none() | FILE_NAMES)
    doc: dict[str, Any] = {"boot-source": boot}
    if draw(st.booleans()):
        mem_mib = st.integers(layout.MIN_MEM_SIZE // MIB, layout.MAX_MEM_SIZE // MIB)
        doc["machine-config"] = {"vcpu_count": 1, "mem_size_mib": draw(mem_mib)}
        if draw(st.booleans()):
            doc["machine-config"]["smt"] = False  # dksm refuses smt: true by name
    for section in ("drives", "network-interfaces"):
        if draw(st.booleans()):
            doc[section] = []
    return doc


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_acceptable())
def test_config_reader_accepts_well_formed_configs(doc: dict[str, Any], scratch: Path) -> None:
    """The other half: the bounds refuse no config Firecracker would take."""
    result = _read(scratch, json.dumps(doc).encode())
    assert isinstance(result, VmConfig), result
    assert result.kernel_path == resolve_image_path(doc["boot-source"]["kernel_image_path"])
    assert result.initrd_path == doc["boot-source"].get("initrd_path")
    assert result.mem_mib == doc.get("machine-config", {}).get("mem_size_mib", 128)
