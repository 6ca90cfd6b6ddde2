"""The examples need the plugin; say so plainly instead of failing on an unknown marker."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # The plugin registers itself under the entry-point name "isolate" (pyproject.toml).
    if not config.pluginmanager.hasplugin("isolate"):
        raise pytest.UsageError(
            "the examples need the pytest-isolate-ns plugin: run `bash ci/quickstart.sh`, "
            "or `pip install -e .` and make sure it is not disabled with `-p no:isolate`"
        )
