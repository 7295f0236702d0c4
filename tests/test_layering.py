"""Imports run one way, and none hides in a function: the package layout of docs/design.md, checked on the source.

Layers, lowest first (a module may import its own layer and the layers below it):
  base (grid, ego, ego_motion, atomic, scores, builder) → data → flow → models → objectives → engine → viz → eval
``flow`` is plain math on tensors (paths, time grids, solvers, guidance) that the models' sampling pipeline
uses; ``eval`` may import ``viz`` (forecast dumps), not the other way round. Imports of ``occ_mfd`` inside
functions are refused (they hide cycles), except under ``if TYPE_CHECKING:``.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "occ_mfd"
LAYERS = {"grid": 0, "ego": 0, "ego_motion": 0, "atomic": 0, "scores": 0, "builder": 0, "data": 1, "flow": 2, "models": 3,
          "objectives": 4, "engine": 5, "viz": 6, "eval": 7}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "occ_mfd":
        raise ValueError(module)
    if len(parts) == 1:
        return -1                                           # the package itself (its __init__ is empty)
    if parts[1] not in LAYERS:
        raise AssertionError(f"occ_mfd.{parts[1]} has no layer in tests/test_layering.py: add it")
    return LAYERS[parts[1]]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def occ_imports(tree: ast.AST, module: str):
    """(node, imported occ_mfd module, inside a function?) for every import in ``tree``."""
    pkg = module.rsplit(".", 1)[0]

    def visit(node, in_func, in_tc):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = in_tc or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "occ_mfd" and not tc:
                        yield child, a.name, f
            elif isinstance(child, ast.ImportFrom) and not tc:
                name = child.module or ""
                if child.level:
                    name = ".".join(pkg.split(".")[: len(pkg.split(".")) - child.level + 1] + ([name] if name else []))
                if name.split(".")[0] == "occ_mfd":
                    yield child, name, f
            yield from visit(child, f, tc)

    yield from visit(tree, False, False)


SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_one_way_and_at_module_level(path):
    module = module_name(path)
    for node, target, in_func in occ_imports(ast.parse(path.read_text()), module):
        where = f"{path.relative_to(PKG.parent)}:{node.lineno}"
        assert not in_func, f"{where}: function-level import of {target} (move it to the top of the module)"
        assert layer_of(target) <= layer_of(module), (
            f"{where}: {module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)}), "
            f"against the layer order {LAYERS}")


def test_the_checker_sees_violations():
    """The checker itself can fail: a function-level import and an upward import are both reported."""
    src = "import occ_mfd.eval.metrics\n\ndef f():\n    from occ_mfd.grid import GridSpec\n"
    found = [(t, f) for _, t, f in occ_imports(ast.parse(src), "occ_mfd.data.x")]
    assert found == [("occ_mfd.eval.metrics", False), ("occ_mfd.grid", True)]
    assert layer_of("occ_mfd.eval.metrics") > layer_of("occ_mfd.data.x")
    tc = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from occ_mfd.eval import metrics\n"
    assert list(occ_imports(ast.parse(tc), "occ_mfd.data.x")) == []
