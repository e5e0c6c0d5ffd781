"""Argument checks shared by the architectures' constructors."""

from __future__ import annotations


def require_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
