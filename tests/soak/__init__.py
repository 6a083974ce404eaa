"""Long-running soak tests (``-m soak``; excluded from the default run)."""
