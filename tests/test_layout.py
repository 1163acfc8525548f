"""The rooms of common/ (common/__init__.py): imports run one way. A module of package P imports `common`
itself and the packages before P in common.LAYERS, never one after it, never a stage script, and no two
modules import each other through any chain (imports inside functions count: they run too)."""

import ast
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, as dotted names (`from common.seg import data` -> common.seg.data)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (ROOT / "common").rglob("*.py")}
    return {m: {i for i in imports(p) if i in modules and i != m} | {i for i in imports(p) if i in SCRIPTS}
            for m, p in modules.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return common.LAYERS.index(parts[1]) if len(parts) > 1 else -1  # `common` itself: below every package


def test_every_module_lives_in_a_package_of_the_order():
    for module in graph():
        parts = module.split(".")
        assert len(parts) == 1 or parts[1] in common.LAYERS, f"{module}: a package not in common.LAYERS"
        assert len(parts) != 2 or module == "common." + parts[1], f"{module}: a loose module in common/, put it in a package"


def test_imports_run_down_the_order_and_never_reach_a_script():
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            if dep in SCRIPTS:
                wrong.append(f"{module} imports the stage script {dep}")
            elif layer(dep) > layer(module):
                wrong.append(f"{module} imports {dep}, a package after its own in common.LAYERS")
    assert not wrong, "\n".join(sorted(wrong))


def circles(g: dict[str, set[str]]) -> list[str]:
    state, found = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                found.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_circle():
    found = circles(graph())
    assert not found, "\n".join(found)


def test_the_check_sees_a_circle(tmp_path, monkeypatch):
    """The circle finder is not vacuous: two modules importing each other are found."""
    pkg = tmp_path / "common" / "runtime"
    pkg.mkdir(parents=True)
    (tmp_path / "common" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from common.runtime import b\n")
    (pkg / "b.py").write_text("def f():\n    from common.runtime.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert circles(graph()) == ["common.runtime.a -> common.runtime.b -> common.runtime.a"]
