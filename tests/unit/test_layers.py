"""The linux and engine layers never import pytest: the engine is a library of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_isolate"


@pytest.mark.parametrize("layer", ["linux", "engine"])
def test_layer_does_not_import_pytest(layer: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and (node.module or "").startswith("plugin"):
                    names.append("pytest")
            if any(n.split(".")[0] in ("pytest", "_pytest", "pluggy") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
