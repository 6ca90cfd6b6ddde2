"""pytest-isolate: run pytest tests in their own container."""

__version__ = "0.1.0"
