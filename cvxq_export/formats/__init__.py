"""Output formats. Each module imports its own dependency lazily."""
