"""Lower layers never import higher ones (docs/DESIGN.md's layering), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parent.parent / "src" / "dksm"
# Lowest first; packages on one level may not import each other's internals either
# way only when listed as separate levels.
LAYERS = {
    "error": 0, "kvm": 1, "arch": 2, "loader": 3, "memory": 4, "devices": 5, "guests": 5,
    "vmm": 6, "dedup": 7, "fleet": 8, "bench": 9, "analyze": 9, "api": 9, "cli": 10,
    "__main__": 11,
}  # fmt: skip


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(n.split(".")[1] for n in names if n.startswith("dksm."))
    return found


def test_no_module_imports_a_higher_layer() -> None:
    offences = []
    for path in sorted(SOURCE.rglob("*.py")):
        package = path.relative_to(SOURCE).parts[0].removesuffix(".py")
        if package == "__init__":
            continue
        for imported in _imported_packages(path):
            if LAYERS[imported] > LAYERS[package]:
                offences.append(f"{path.relative_to(SOURCE)} imports dksm.{imported}")
    assert offences == []


def test_the_page_pool_stands_alone() -> None:
    """The pool serves any Python program: it needs neither KVM nor the VMM."""
    for path in (SOURCE / "dedup").glob("*.py"):
        assert _imported_packages(path) <= {"error", "memory", "dedup"}, path.name
