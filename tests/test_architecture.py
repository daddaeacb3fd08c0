"""The package's structure, checked from its source (docs/design.md, "Layout").

* Modules are in layers; a module imports only from layers below its own
  (or from its own package's lower modules): no cycles, nothing upward. The
  rules and the storage never import the daemon, the ATP layer or the CLI.
* No module reaches into another module's or object's private names
  (``x._name`` where ``x`` is not ``self``/``cls``, ``from m import _name``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spoolq"

# Lower numbers are lower layers. Within one layer, modules may not import
# each other unless listed in SAME_LAYER_ORDER (the first may be imported by
# the later ones).
LAYERS: dict[str, int] = {
    "spoolq._version": 0,
    "spoolq.errors": 0, "spoolq.names": 0, "spoolq.faults": 0, "spoolq.systemd": 0, "spoolq.watch": 0,
    "spoolq.units": 0,
    "spoolq.lifecycle": 1,
    "spoolq.store": 2, "spoolq.store.fsutil": 2, "spoolq.store.codec": 2, "spoolq.store.layout": 2,
    "spoolq.store.taskdir": 2, "spoolq.store.registry": 2, "spoolq.store.servers": 2, "spoolq.store.queue": 2,
    "spoolq.store.slots": 2, "spoolq.store.output": 2, "spoolq.store.metrics": 2,
    "spoolq.queries": 3, "spoolq.follow": 3,
    "spoolq.producer": 4, "spoolq.spool": 4,
    "spoolq.task": 5, "spoolq.sweeps": 5,
    "spoolq.worker": 6, "spoolq.worker.proctree": 6, "spoolq.worker.limits": 6, "spoolq.worker.runner": 6,
    "spoolq.worker.capture": 6, "spoolq.worker.hygiene": 6,
    "spoolq.worker.remote": 6, "spoolq.worker.dask_executor": 6, "spoolq.worker.executor": 6, "spoolq.worker.loop": 6,
    "spoolq.worker.gates": 6,
    "spoolq.fsck": 6, "spoolq.tracker": 6,
    "spoolq.demo": 7,
    "spoolq.cli": 8,
    "spoolq": 9, "spoolq.__main__": 9, "spoolq._manpage": 9,
}
SAME_LAYER_ORDER = [
    ["spoolq.store.fsutil", "spoolq.store.layout", "spoolq.store.codec", "spoolq.store.output", "spoolq.store.taskdir",
     "spoolq.store.registry", "spoolq.store.servers", "spoolq.store.slots", "spoolq.store.queue",
     "spoolq.store.metrics", "spoolq.store"],
    ["spoolq.queries", "spoolq.follow"],
    ["spoolq.producer", "spoolq.spool"],
    ["spoolq.worker.proctree", "spoolq.worker.limits", "spoolq.worker.capture", "spoolq.worker.hygiene",
     "spoolq.worker.runner",
     "spoolq.worker.executor",
     "spoolq.worker.remote", "spoolq.worker.dask_executor", "spoolq.worker.gates", "spoolq.worker.loop",
     "spoolq.worker"],
    ["spoolq.sweeps", "spoolq.fsck"],
]
# Layer 0 modules that others at layer 0 may use.
LOW_ORDER = ["spoolq._version", "spoolq.errors", "spoolq.names", "spoolq.faults", "spoolq.systemd", "spoolq.watch"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """spoolq modules that *name* imports, anywhere in the file (function-level too)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("spoolq"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in LAYERS else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("spoolq")}
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {name: imports_of(name, tree, name in packages) for name, tree in found.items()}


def test_every_module_has_a_layer():
    assert set(graph()) <= set(LAYERS), sorted(set(graph()) - set(LAYERS))


def _allowed(src: str, dst: str) -> bool:
    if LAYERS[dst] < LAYERS[src]:
        return True
    if LAYERS[dst] > LAYERS[src]:
        return False
    for order in [*SAME_LAYER_ORDER, LOW_ORDER]:
        if src in order and dst in order:
            return order.index(dst) < order.index(src)
    return False


def test_imports_only_go_down():
    upward = sorted(f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts if not _allowed(src, dst))
    assert not upward, upward


def test_there_are_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [])


def test_the_rules_the_store_and_the_daemon_do_not_import_upward():
    edges = graph()
    for low in ("spoolq.lifecycle", *(m for m in LAYERS if m.startswith("spoolq.store"))):
        assert not edges.get(low, set()) & {"spoolq.spool", "spoolq.worker", "spoolq.tracker", "spoolq.cli"}
    for name, dsts in edges.items():
        if name.startswith("spoolq.worker"):
            assert "spoolq.tracker" not in dsts and "spoolq.cli" not in dsts, name
    assert "spoolq.cli" not in edges["spoolq.demo"]


ALLOWED_PRIVATE = {("os", "_exit"), ("sys", "_getframe")}


def test_nothing_reaches_into_private_names():
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")
                          and (node.level or (node.module or "").startswith("spoolq"))]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Name) and (owner.id, node.attr) in ALLOWED_PRIVATE:
                    continue
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
