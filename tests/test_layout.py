"""The package's import graph: no cycle, and no module imports from a stage above its own.

Every import counts, also those inside functions (they hide cycles, they do not remove them).
The layers, from the bottom: shared vocabulary; decoding, preprocessing and support (bundles,
stores, patches, training, evaluation, jobs); Stage 1; Stage 2's learners; the ensemble; the
pipeline; and the entry points (the jobs and commands that drive the rest).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "patchflannel"

LAYERS = [
    ["errors", "labels", "files"],
    ["devices", "losses", "options", "runtime", "io", "preprocess", "manifest", "bundle", "hub", "pretrained", "store", "patches",
     "training", "evaluation", "jobs"],
    ["segment"],
    ["learners"],
    ["ensemble"],
    ["pipeline", "explain", "viz"],
    ["predict", "demo", "evaluate", "cv", "ablation", "tune", "cli"],
]
#: Modules run as programs sit on top, whatever package they are in.
ENTRY_POINTS = {"__main__", "segment.__main__", "ensemble.__main__", "bundle.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Package modules ``path`` imports (relative to the package, ``""`` for the package itself)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("patchflannel"):
                target = node.module.removeprefix("patchflannel").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` imports the module x
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if (PACKAGE / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("patchflannel").lstrip(".") for a in node.names
                      if a.name.startswith("patchflannel")}
    return {m for m in found if m and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module in ENTRY_POINTS or module.endswith(".__main__"):
        return len(LAYERS)
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if module in names or top in names:
            return i
    raise AssertionError(f"patchflannel.{module} sits in no layer: add it to LAYERS")


def test_every_module_sits_in_a_layer():
    for module in graph():
        if module:
            layer(module)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{m} (layer {layer(m)}) -> {t} (layer {layer(t)})" for m, targets in graph().items() if m
              for t in targets if t and layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a cycle of the code: leave it out.
    edges = {m: {t for t in ts if not (t and m.startswith(t + "."))} for m, ts in edges.items() if m}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
