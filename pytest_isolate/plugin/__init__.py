"""Plugin layer: pytest hooks, marker, options, fixtures and reports (the only layer importing pytest)."""
