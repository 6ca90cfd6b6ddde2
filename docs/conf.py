"""Sphinx configuration for the pytest-isolate documentation (builtin extensions only).

Build with warnings as errors:

    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import re
from pathlib import Path

_INIT = Path(__file__).resolve().parent.parent / "pytest_isolate" / "__init__.py"
_match = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(encoding="utf-8"), re.M)

project = "pytest-isolate"
author = "pytest-isolate developers"
copyright = "pytest-isolate developers"
release = _match.group(1) if _match else "unknown"
version = ".".join(release.split(".")[:2])

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
highlight_language = "python"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"pytest-isolate {release}"
html_static_path: list[str] = []
