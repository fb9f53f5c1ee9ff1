"""The dependency rule, checked over the source (ast, no imports run): core <- tasks <- flows and
core <- models. A step or the trainer that imports a flow module would pull Prefect and the flows'
side effects into every process that only wanted a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it may import
ALLOWED = {"core": {"core"}, "tasks": {"core", "tasks"}, "models": {"core", "models"},
           "flows": {"core", "tasks", "models", "flows"}}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_each_layer_imports_only_the_layers_below_it():
    broken = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, name in imports(path):
                top = name.split(".")[0]
                if top in ALLOWED and top not in allowed:
                    broken.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not broken, "imports against core <- tasks <- flows, core <- models:\n" + "\n".join(broken)


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a step importing a flow module is found."""
    bad = tmp_path / "step.py"
    bad.write_text("import json\nfrom flows.train import train_flow\n\ndef f():\n    from flows import progress\n")
    assert [n for _, n in imports(bad)] == ["json", "flows.train", "flows"]
