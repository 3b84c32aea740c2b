"""Number formatting shared by the model card and the terminal tables, so both state a number the same way."""

from __future__ import annotations

__all__ = ["number", "size"]


def size(n: float) -> str:
    """Bytes in decimal units, as the Hub shows file sizes: `512 B`, `134.5 MB`, `1.2 GB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def number(x: float | None, fmt: str = ".3f") -> str:
    """`x` in format `fmt`; an em dash when there is no number."""
    return "—" if x is None else format(x, fmt)
