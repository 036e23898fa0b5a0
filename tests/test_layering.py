"""Lower layers never import higher ones (docs/DESIGN.md's layering), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parent.parent / "src" / "dksm"
# Lowest first; packages on one level may not import each other's internals either
# way only when listed as separate levels.
LAYERS = {
    "error": 0, "value": 0, "kvm": 1, "arch": 2, "x86emu": 2, "loader": 3, "memory": 4,
    "devices": 5, "guests": 5, "vmm": 6, "dedup": 7, "fleet": 8, "bench": 9, "analyze": 9, "api": 9,
    "cluster": 10, "cli": 11, "__main__": 12,
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
        assert _imported_packages(path) <= {"error", "value", "memory", "dedup"}, path.name


def test_only_the_index_module_uses_lmdb() -> None:
    """The index owns the LMDB schema; everyone else goes through it."""
    users = []
    for path in (SOURCE / "dedup").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "lmdb" for a in node.names):
                users.append(path.name)
            if isinstance(node, ast.ImportFrom) and node.module == "lmdb":
                users.append(path.name)
    assert users == ["index.py"]


def test_the_lease_uses_no_private_part_of_the_pool() -> None:
    tree = ast.parse((SOURCE / "dedup" / "lease.py").read_text())
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "pool"
        and node.attr.startswith("_")
    ]
    assert private == []


def _runtime_imports(path: Path) -> set[str]:
    """The dksm modules ``path`` imports when it runs (``if TYPE_CHECKING:`` aside)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                visit(node.orelse)
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    if inner.module == "dksm" or inner.module.startswith("dksm."):
                        found.update(f"{inner.module}.{a.name}" for a in inner.names)
                elif isinstance(inner, ast.Import):
                    found.update(a.name for a in inner.names if a.name.startswith("dksm."))

    visit(ast.parse(path.read_text()).body)
    return found


def test_small_modules_import_only_what_their_job_needs() -> None:
    """Modules other code leans on without wanting their neighbours: the exit decoder
    needs only the ABI (and the value base), admission nothing of the pool, the
    fleet's file protocol nothing of dksm, and the exit statuses nothing of the VM
    (start-up time)."""
    allowed = {
        "kvm/exits.py": {"dksm.kvm.abi", "dksm.value.Value"},
        "dedup/admission.py": {"dksm.memory.host_mapping.PAGE_SIZE"},
        "fleet/directory.py": set(),
        "vmm/exit_status.py": set(),
    }
    for module, imports in allowed.items():
        assert _runtime_imports(SOURCE / module) <= imports, module
