"""pytest-isolate: run pytest tests — and any program or callable — in their own container.

The Sandbox API (``pytest_isolate.Sandbox``) needs no pytest; its names load on first use so that
importing the plugin stays cheap.
"""

from __future__ import annotations

TYPE_CHECKING = False  # the sandbox factory imports this package: keep typing out (linux/record.py)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_API = {
    "Sandbox": "sandbox", "SandboxResult": "sandbox", "SandboxProcess": "process", "ExecFailed": "process",
    "TimeoutExpired": "process", "SandboxSpec": "spec", "SpecError": "spec", "Measurement": "accounting",
    "IsolationUnavailable": "errors", "IsolationDegradedWarning": "errors", "SandboxCallError": "errors",
    "SandboxRunError": "errors", "Network": "network",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"pytest_isolate.engine.{_API[name]}"), name)
    raise AttributeError(f"module 'pytest_isolate' has no attribute {name!r}")
