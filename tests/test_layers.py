"""Imports run one way: data, lens -> diagnosis -> training -> runs -> cli (and the integrations,
the pytest plugin and ``autohdr.attach`` on top). Read from the source with ``ast``, so a lazy import
inside a function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autohdr"

#: layer -> the autohdr layers its modules may import (besides its own).
ALLOWED: dict[str, set[str]] = {
    "data": set(),
    "lens": {"data"},        # evaluation checks each batch's range with the data layer's check
    "diagnosis": {"lens", "data"},
    "training": {"lens", "data", "diagnosis"},
    "runs": {"lens", "data", "diagnosis", "training"},
}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "autohdr" else None


def _autohdr_imports(path: Path) -> set[str]:
    """Every ``autohdr.*`` module ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("autohdr")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("autohdr"):
            if node.module == "autohdr":
                found |= {f"autohdr.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def _violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in sorted(_autohdr_imports(path)):
            target = _layer_of(module)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    assert _violations(layer) == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The red case: a diagnosis module importing the trainer is reported."""
    fake = tmp_path / "autohdr"
    (fake / "diagnosis").mkdir(parents=True)
    (fake / "diagnosis" / "bad.py").write_text("def f():\n    from autohdr.training.trainer import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations("diagnosis") == ["autohdr/diagnosis/bad.py imports autohdr.training.trainer"]


def test_every_package_is_assigned_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages - set(ALLOWED) <= {"integrations", "testing"}
