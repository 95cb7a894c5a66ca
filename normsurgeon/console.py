"""Plain-text output of the command line and the demo: lines, wrapped paragraphs, aligned tables."""
from __future__ import annotations

import textwrap


def out(text: str = "") -> None:
    """Print one line (flushed, so it interleaves with progress on stderr)."""
    print(text, flush=True)


def wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)


def grid(rows) -> str:
    """Rows of strings as left-aligned columns, indented by three spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
