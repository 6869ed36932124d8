"""Rewrite one benchmark's section of docs/performance.md in place.

Each benchmark owns the text between two identical marker lines (e.g. ``<!-- bench_planner -->``),
so a run updates its own figures and leaves every other section as it is.
"""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, mark: str, body: str) -> None:
    """Replace the text between the two ``mark`` lines of ``path`` (append them if absent)."""
    text = path.read_text() if path.exists() else "# Performance\n"
    section = f"{mark}\n{body}{mark}\n"
    if text.count(mark) == 2:
        start, end = text.index(mark), text.rindex(mark) + len(mark) + 1
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
