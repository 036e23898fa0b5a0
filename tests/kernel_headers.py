"""Numbers from the kernel's own UAPI headers: a C program compiled with the system
gcc prints each C expression asked for, so layouts dksm declares by hand are checked
against the kernel instead of against themselves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INCLUDE = Path("/usr/include")


def require_headers(*headers: str) -> None:
    """Skip the calling test, with the reason, where gcc or a header is missing."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed: cannot compile against the kernel headers")
    for header in headers:
        if not (INCLUDE / header).exists() and not (INCLUDE / "x86_64-linux-gnu" / header).exists():
            pytest.skip(f"<{header}> missing (Debian: linux-libc-dev; `make` installs it as root)")


def evaluate(workdir: Path, headers: list[str], expressions: dict[str, str]) -> dict[str, int]:
    """Each expression's value, by key, as the compiler sees it with ``headers``."""
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{header}>" for header in headers]
    lines.append("int main(void) {")
    for key, expression in expressions.items():
        lines.append(f'    printf("%s %llu\\n", "{key}", (unsigned long long)({expression}));')
    lines += ["    return 0;", "}"]
    source = workdir / "facts.c"
    binary = workdir / "facts"
    source.write_text("\n".join(lines) + "\n")
    built = subprocess.run(
        ["gcc", "-o", str(binary), str(source)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr  # a name or member the kernel lacks
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=10)
    facts = {}
    for line in printed.stdout.splitlines():
        key, _, value = line.rpartition(" ")
        facts[key] = int(value)
    return facts
