"""Repository scripts; `arch_check` is importable (the architecture test uses it)."""
