"""Imports flow one way (docs/architecture.md, "Layers and import rules").

Every `import` and `from ... import` in the package, at module level or inside a function, is resolved to the
`mindspeed_mm` subpackage it names and checked against the rules below.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "mindspeed_mm"

# subpackage (or top-level module) -> the ones it must never import
FORBIDDEN: Dict[str, Set[str]] = {
    "models": {"training", "arguments", "inference", "tools", "checkpoint_cli", "cli"},
    "checkpoint": {"models", "training", "arguments", "inference", "tools"},
    "parallel": {"models", "training", "arguments", "inference", "tools", "checkpoint", "data"},
    "io": {"models", "training", "arguments", "inference", "tools", "checkpoint", "data"},
    "data": {"training", "arguments", "inference", "tools"},
    "config": {"models", "training", "inference", "tools", "checkpoint", "data"},
}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> List[Tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ("mindspeed_mm", "models", ...)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "mindspeed_mm" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            if module[0] != "mindspeed_mm":
                continue
            if len(module) > 1:
                found.append((node.lineno, module[1]))
            else:  # from mindspeed_mm import x
                found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def test_imports_flow_one_way():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        banned = FORBIDDEN.get(unit, set())
        for line, target in _imported_units(path):
            if target in banned:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {target}")
    assert not violations, "imports against the layering rules:\n" + "\n".join(violations)


def test_the_rule_checker_sees_relative_and_lazy_imports(tmp_path):
    # The checker must catch a lazy relative import inside a function, the form most violations take.
    fake = PACKAGE / "models" / "_import_rule_probe.py"
    fake.write_text("def f():\n    from ..training import train\n    import mindspeed_mm.inference\n")
    try:
        assert _imported_units(fake) == [(2, "training"), (3, "inference")]
    finally:
        fake.unlink()
