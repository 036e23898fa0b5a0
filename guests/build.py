#!/usr/bin/env python3
"""Build the dksm guest images (one ELF per app) from guests/.

    python3 guests/build.py --out src/dksm/guests/images            # shipped, aligned
    python3 guests/build.py --layout naive --out guests/build/naive  # for comparison

Uses only the Python standard library plus gcc, ld and objdump from the
system.  The build is reproducible: the same sources and toolchain give
byte-identical ELF files (no paths, timestamps or build ids end up in them;
run with --verify-reproducible to build twice and compare).

After linking, every image is checked (see check_image and check_sharing):
ELF shape and entry point, PT_LOAD flags and page alignment, p_paddr ==
p_vaddr, no SSE/x87 instruction outside the sseprobe app code, library text
size, and, for the aligned layout, that every page of the library's text,
rodata and data is byte-identical across all apps while app pages differ.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
REPO = GUESTS.parent
sys.path.insert(0, str(GUESTS))
import gen_bank  # noqa: E402

PAGE = 4096
APPS = (
    "hello", "idle", "compute", "cowprobe", "sseprobe", "vecprobe", "smpprobe", "platprobe", "echo",
    "virtioprobe",
)
#: Apps whose own C file is allowed to use SSE (the library part never is).
SSE_APPS = frozenset({"sseprobe", "vecprobe"})
LIB_SOURCES = (
    "lib/boot.S",
    "lib/kit.c",
    "lib/console.c",
    "lib/fmt.c",
    "lib/string.c",
    "lib/bootparams.c",
    "lib/trap.c",
    "lib/hash.c",
)
LAYOUTS = ("aligned", "naive")
SHIPPED_OUT = REPO / "src" / "dksm" / "guests" / "images"
MIN_LIB_TEXT = 256 * 1024
MEM_LIMIT = 16 << 20

CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-march=x86-64",
    "-mtune=generic",
    "-m64",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-nostdinc",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-stack-clash-protection",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-exceptions",
    "-fno-common",
    "-fno-ident",
    # No SHF_MERGE string sections: ld would merge app strings into the
    # library's string section and shift the library's rodata.
    "-fno-merge-constants",
    # Do not turn loops into memset/memcpy calls (memset itself is a loop).
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
]
NOSSE = ["-mgeneral-regs-only"]
SSE = ["-msse2", "-mno-avx"]
WERROR = ["-Werror"]
GEN_FLAGS = ["-Wno-unused-parameter"]
LDFLAGS = [
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "--build-id=none",
    "-z",
    "max-page-size=4096",
    "-z",
    "common-page-size=4096",
    "-z",
    "noexecstack",
    "--orphan-handling=error",
    "--no-warn-rwx-segments",
    "--fatal-warnings",
]
#: Instructions or registers that mean SSE/AVX/x87/XSAVE state is used.
FORBIDDEN = re.compile(
    r"%[xyz]mm\d|%mm\d|%st\b|%st\(|\b(ld|st)mxcsr\b|\bfx(save|rstor)|\bxsave|\bxrstor|\bf(ld|st|nstcw|ldcw|init)\b"
)


class BuildError(Exception):
    pass


# --------------------------------------------------------------------------
# running tools


def _env() -> dict[str, str]:
    # A fixed, minimal environment: nothing like CPATH, GCC_EXEC_PREFIX or a
    # locale can change what the tools produce.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def run(cmd: list[str], cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise BuildError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    if p.stderr.strip():
        sys.stderr.write(p.stderr)
    return p.stdout


def compile_one(
    cc: str, src: Path, obj: Path, flags: list[str], prefix_maps: dict[Path, str]
) -> Path:
    # Compile from the source's own directory with a bare file name, so that
    # the STT_FILE symbol holds no path; map prefixes for anything else.
    maps = [f"-ffile-prefix-map={k}={v}" for k, v in prefix_maps.items()]
    cmd = [cc, *CFLAGS, *flags, *maps, f"-I{GUESTS / 'include'}", "-c", src.name, "-o", str(obj)]
    run(cmd, cwd=src.parent)
    return obj


# --------------------------------------------------------------------------
# a small ELF64 reader


@dataclass
class Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass
class Section:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int


@dataclass
class Elf:
    path: Path
    data: bytes
    entry: int
    etype: int
    machine: int
    segments: list[Segment] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    symbols: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Elf:
        d = path.read_bytes()
        if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
            raise BuildError(f"{path}: not a little-endian ELF64 file")
        (
            etype,
            machine,
            _ver,
            entry,
            phoff,
            shoff,
            _flags,
            _ehsize,
            phentsize,
            phnum,
            shentsize,
            shnum,
            shstrndx,
        ) = struct.unpack_from("<HHIQQQIHHHHHH", d, 16)
        elf = cls(path, d, entry, etype, machine)
        if phentsize != 56:
            raise BuildError(f"{path}: e_phentsize {phentsize}")
        for i in range(phnum):
            t, fl, off, va, pa, fs, ms, al = struct.unpack_from("<IIQQQQQQ", d, phoff + i * 56)
            elf.segments.append(Segment(t, fl, off, va, pa, fs, ms, al))
        raw = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
        stro = raw[shstrndx][4]

        def name_at(base: int, off: int) -> str:
            end = d.index(b"\0", base + off)
            return d[base + off : end].decode()

        for s in raw:
            elf.sections.append(Section(name_at(stro, s[0]), s[1], s[2], s[3], s[4], s[5]))
        for s in raw:
            if s[1] == 2:  # SHT_SYMTAB
                strtab = raw[s[6]][4]
                for j in range(s[5] // 24):
                    st_name, _info, _other, _shndx, value, _size = struct.unpack_from(
                        "<IBBHQQ", d, s[4] + j * 24
                    )
                    if st_name:
                        elf.symbols.setdefault(name_at(strtab, st_name), value)
        return elf

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise BuildError(f"{self.path.name}: no section {name}")

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise BuildError(f"{self.path.name}: no symbol {name}") from None

    def memory(self) -> dict[int, bytes]:
        """Guest-physical page number -> 4 KiB contents, as a loader sees it."""
        pages: dict[int, bytearray] = {}
        for s in self.segments:
            if s.type != 1:
                continue
            img = self.data[s.offset : s.offset + s.filesz] + bytes(s.memsz - s.filesz)
            for i, b in enumerate(range(s.paddr, s.paddr + s.memsz, PAGE)):
                pn, po = divmod(b, PAGE)
                pg = pages.setdefault(pn, bytearray(PAGE))
                chunk = img[i * PAGE : (i + 1) * PAGE]
                pg[po : po + len(chunk)] = chunk
        return {k: bytes(v) for k, v in sorted(pages.items())}


# --------------------------------------------------------------------------
# checks


def _align_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


def lib_ranges(elf: Elf) -> dict[str, tuple[int, int]]:
    """Library and app address ranges [start, end) from linker symbols."""
    out = {}
    for part in ("lib", "app"):
        for sec in ("text", "rodata", "data", "bss"):
            start = elf.sym(f"__dksm_{part}_{sec}_start")
            out[f"{part}_{sec}"] = (start, elf.sym(f"__dksm_{part}_{sec}_end"))
    return out


def check_image(app: str, elf: Elf, layout: str, objdump: str) -> None:
    """Check one image; raises BuildError on failure."""
    errs = []
    name = elf.path.name
    if elf.etype != 2 or elf.machine != 62:
        errs.append("not an x86-64 ET_EXEC")
    entry_sym = elf.sym("_dksm_entry")
    if elf.entry != entry_sym:
        errs.append(f"e_entry {elf.entry:#x} != _dksm_entry {entry_sym:#x}")
    if layout == "aligned" and elf.entry != 0x100000:
        errs.append(f"entry {elf.entry:#x} is not 0x100000")
    if elf.entry < 0x100000:
        errs.append("entry below 1 MiB")
    loads = [s for s in elf.segments if s.type == 1]
    if any(s.type not in (1,) for s in elf.segments):
        errs.append(f"unexpected program headers: {[hex(s.type) for s in elf.segments]}")
    want = {".text": 5, ".rodata": 4, ".data": 6, ".bss": 6}
    for sname, flags in want.items():
        sec = elf.section(sname)
        if sec.addr % PAGE:
            errs.append(f"{sname} at {sec.addr:#x} is not page aligned")
        seg = [s for s in loads if s.vaddr <= sec.addr < s.vaddr + max(s.memsz, 1)]
        if len(seg) != 1:
            errs.append(f"{sname} is not in exactly one PT_LOAD")
        elif seg[0].flags != flags:
            errs.append(f"{sname} segment flags {seg[0].flags} != {flags}")
    for s in loads:
        if s.paddr != s.vaddr:
            errs.append(f"segment p_paddr {s.paddr:#x} != p_vaddr {s.vaddr:#x}")
        if s.vaddr % PAGE or s.offset % PAGE:
            errs.append(f"segment at {s.vaddr:#x} (offset {s.offset:#x}) not page aligned")
        if (s.flags & 2) and (s.flags & 1):
            errs.append(f"segment at {s.vaddr:#x} is writable and executable")
        if s.vaddr + s.memsz > MEM_LIMIT:
            errs.append(f"segment at {s.vaddr:#x} ends beyond 16 MiB")
    r = lib_ranges(elf)
    lib_text = r["lib_text"][1] - r["lib_text"][0]
    if lib_text < MIN_LIB_TEXT:
        errs.append(f"library text is {lib_text} bytes, want >= {MIN_LIB_TEXT}")
    if elf.sym("app_main") != r["app_text"][0]:
        errs.append("app_main is not at the start of the app text")
    # No SSE/x87: disassemble and look at every instruction.
    dis = run([objdump, "-d", "--no-show-raw-insn", "-M", "att", str(elf.path)])
    app_lo, app_hi = r["app_text"]
    bad = []
    for line in dis.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if not m or not FORBIDDEN.search(m.group(2)):
            continue
        addr = int(m.group(1), 16)
        if app in SSE_APPS and app_lo <= addr < app_hi:
            continue
        bad.append(line.strip())
    if bad:
        errs.append(f"{len(bad)} SSE/x87 instructions, e.g. {bad[:3]}")
    if errs:
        raise BuildError(f"{name}: " + "; ".join(errs))


def check_sharing(images: dict[str, Elf], layout: str) -> list[str]:
    """Library pages identical across apps (aligned layout), app pages not."""
    notes = []
    mems = {a: e.memory() for a, e in images.items()}
    apps = list(images)
    ref = images[apps[0]]
    r0 = lib_ranges(ref)
    lib_pages: list[int] = []
    for sec in ("text", "rodata", "data"):
        lo, hi = r0[f"lib_{sec}"]
        lib_pages += range(lo // PAGE, _align_up(hi) // PAGE)
    if layout == "aligned":
        for a in apps[1:]:
            ra = lib_ranges(images[a])
            for sec in ("text", "rodata", "data", "bss"):
                if ra[f"lib_{sec}"] != r0[f"lib_{sec}"]:
                    raise BuildError(
                        f"{a}: library {sec} range {ra[f'lib_{sec}']} differs from {apps[0]}"
                    )
            diff = [p for p in lib_pages if mems[a].get(p) != mems[apps[0]].get(p)]
            if diff:
                raise BuildError(
                    f"{a}: {len(diff)} library pages differ from {apps[0]}, "
                    f"first at {diff[0] * PAGE:#x}"
                )
        for a, b in itertools.combinations(apps, 2):
            pa = lib_ranges(images[a])["app_text"][0] // PAGE
            if mems[a].get(pa) == mems[b].get(pa):
                raise BuildError(f"{a} and {b}: first app text page is identical")
        notes.append(
            f"library pages identical across {len(apps)} apps: {len(lib_pages)} "
            f"({len(lib_pages) * PAGE // 1024} KiB: text+rodata+data)"
        )
    # Statistics, both layouts: same-address identical pages and content
    # duplicates (what KSM could merge), zero pages excluded.
    zero = bytes(PAGE)
    for a, b in itertools.combinations(apps, 2):
        ma, mb = mems[a], mems[b]
        nz = [p for p in ma if ma[p] != zero]
        same = sum(1 for p in nz if mb.get(p) == ma[p])
        content_b = {v for v in mb.values() if v != zero}
        anywhere = sum(1 for p in nz if ma[p] in content_b)
        notes.append(
            f"{a:>8} vs {b:<8}: {same:3d}/{len(nz)} non-zero pages of {a} identical at the "
            f"same address, {anywhere:3d} found anywhere in {b}"
        )
    allpages = [v for m in mems.values() for v in m.values() if v != zero]
    notes.append(f"all images: {len(allpages)} non-zero pages, {len(set(allpages))} distinct")
    return notes


# --------------------------------------------------------------------------
# the build


def describe(app: str, elf: Elf) -> str:
    r = lib_ranges(elf)
    size = elf.path.stat().st_size

    def rng(k: str) -> str:
        lo, hi = r[k]
        return f"{lo:#x}-{hi:#x}"

    return (
        f"{app + '.elf':>13} {size:7d} B  sha256 {hashlib.sha256(elf.data).hexdigest()[:16]}  "
        f"lib text {rng('lib_text')} rodata {rng('lib_rodata')} data {rng('lib_data')} "
        f"bss {rng('lib_bss')} | app text {rng('app_text')} rodata {rng('app_rodata')} "
        f"data {rng('app_data')} bss {rng('app_bss')}"
    )


def build(
    layout: str,
    out: Path,
    build_dir: Path,
    apps: tuple[str, ...],
    cc: str,
    ld: str,
    objdump: str,
    jobs: int,
    quiet: bool = False,
) -> dict[str, Path]:
    log = (lambda *a: None) if quiet else print
    if build_dir.exists():
        shutil.rmtree(build_dir)
    gen_dir = build_dir / "gen"
    obj_dir = build_dir / "obj"
    link_dir = build_dir / layout
    for d in (gen_dir, obj_dir, link_dir):
        d.mkdir(parents=True)
    bank_sources = sorted(gen_bank.generate(gen_dir))
    maps = {GUESTS: "guests", gen_dir: "gen", build_dir: "build"}

    tasks = []
    lib_objs = []
    for rel in LIB_SOURCES:
        src = GUESTS / rel
        obj = obj_dir / ("lib_" + src.name.replace(".", "_") + ".o")
        tasks.append((src, obj, NOSSE + WERROR))
        lib_objs.append(obj)
    for src in bank_sources:
        obj = obj_dir / (src.stem + ".o")
        tasks.append((src, obj, NOSSE + GEN_FLAGS))
        lib_objs.append(obj)
    app_objs = {}
    for app in apps:
        src = GUESTS / "apps" / f"{app}.c"
        obj = obj_dir / f"app_{app}.o"
        tasks.append((src, obj, (SSE if app in SSE_APPS else NOSSE) + WERROR))
        app_objs[app] = obj
    log(f"compiling {len(tasks)} files with {cc} ...")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(compile_one, cc, s, o, f, maps) for s, o, f in tasks]
        for f in futs:
            f.result()

    libdksm = obj_dir / "libdksm.o"
    run([ld, "-m", "elf_x86_64", "-r", "-o", str(libdksm), *map(str, lib_objs)])
    script = GUESTS / "ld" / f"{layout}.ld"
    images: dict[str, Elf] = {}
    for app in apps:
        elf_path = link_dir / f"{app}.elf"
        run(
            [ld, *LDFLAGS, "-T", str(script), "-o", str(elf_path), str(libdksm), str(app_objs[app])]
        )
        elf = Elf.read(elf_path)
        check_image(app, elf, layout, objdump)
        images[app] = elf
    notes = check_sharing(images, layout)

    out.mkdir(parents=True, exist_ok=True)
    result = {}
    log(f"layout {layout}: images in {out}")
    for app, elf in images.items():
        dst = out / f"{app}.elf"
        if not dst.exists() or dst.read_bytes() != elf.data:
            tmp = dst.with_suffix(".elf.tmp")
            tmp.write_bytes(elf.data)
            os.chmod(tmp, 0o644)
            tmp.replace(dst)
        result[app] = dst
        log(describe(app, elf))
    for n in notes:
        log("  " + n)
    return result


def check_dir(d: Path, layout: str, apps: tuple[str, ...], objdump: str) -> None:
    images = {}
    for app in apps:
        elf = Elf.read(d / f"{app}.elf")
        check_image(app, elf, layout, objdump)
        images[app] = elf
        print(describe(app, elf))
    for n in check_sharing(images, layout):
        print("  " + n)
    print(f"{len(apps)} images in {d} pass the {layout} checks")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="output directory for NAME.elf "
        "(default: src/dksm/guests/images for aligned, guests/build/naive-images for naive)",
    )
    ap.add_argument("--layout", choices=LAYOUTS, default="aligned")
    ap.add_argument("--apps", default=",".join(APPS), help="comma-separated apps (default: all)")
    ap.add_argument(
        "--build-dir", type=Path, help="scratch directory (default: guests/build/<layout>)"
    )
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cc", default="gcc")
    ap.add_argument("--ld", default="ld")
    ap.add_argument("--objdump", default="objdump")
    ap.add_argument(
        "--verify-reproducible",
        action="store_true",
        help="build a second time in a temporary directory and compare bytes",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="allow writing a naive build to the shipped directory",
    )
    ap.add_argument(
        "--check-only",
        type=Path,
        metavar="DIR",
        help="do not build: run the image checks on DIR/<app>.elf (with --layout)",
    )
    args = ap.parse_args(argv)

    apps = tuple(a for a in args.apps.split(",") if a)
    for a in apps:
        if a not in APPS:
            ap.error(f"unknown app {a!r}; known: {', '.join(APPS)}")
    if not apps:
        ap.error("no apps")
    out = args.out or (
        SHIPPED_OUT if args.layout == "aligned" else GUESTS / "build" / "naive-images"
    )
    out = out.resolve()
    if args.layout != "aligned" and out == SHIPPED_OUT.resolve() and not args.force:
        ap.error("refusing to write a naive build to the shipped image directory (use --force)")
    build_dir = (args.build_dir or GUESTS / "build" / args.layout).resolve()
    for tool in (args.cc, args.ld, args.objdump):
        if not shutil.which(tool):
            print(f"build.py: {tool} not found", file=sys.stderr)
            return 1
    if args.check_only:
        try:
            check_dir(args.check_only, args.layout, apps, args.objdump)
        except BuildError as e:
            print(f"build.py: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        first = build(args.layout, out, build_dir, apps, args.cc, args.ld, args.objdump, args.jobs)
        if args.verify_reproducible:
            with tempfile.TemporaryDirectory(prefix="dksm-guests-") as td:
                second = build(
                    args.layout,
                    Path(td) / "out",
                    Path(td) / "build",
                    apps,
                    args.cc,
                    args.ld,
                    args.objdump,
                    args.jobs,
                    quiet=True,
                )
                for app in apps:
                    if first[app].read_bytes() != second[app].read_bytes():
                        raise BuildError(f"{app}.elf is not reproducible")
            print(
                "reproducible: a second build in another directory gave identical bytes"
                f" for {len(apps)} images"
            )
    except BuildError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
