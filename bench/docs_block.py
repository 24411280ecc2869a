"""Write a benchmark's generated figures into docs/benchmarks.md between markers.

Each bench owns one block ``<!-- NAME:begin --> ... <!-- NAME:end -->`` under its ``## heading``; a rerun
replaces only that block, so hand-written reading of the figures around it survives.
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_block(name: str, heading: str, body: str, path: Path = DOCS) -> Path:
    """Replace the ``name`` block of ``path`` with ``body``.

    Without the markers yet, the block goes right under ``heading`` (appended with it if absent).
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n\n{body.strip()}\n\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif heading + "\n" in text:
        head, rest = text.split(heading + "\n", 1)
        text = f"{head}{heading}\n\n{block}\n{rest}"
    else:
        text = f"{text.rstrip()}\n\n{heading}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
