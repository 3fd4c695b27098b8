"""bench/RESULTS.md: where each bench's `--record` adds its rows (above its marker line)."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def add_rows(marker: str, lines: str, results: Path = RESULTS) -> None:
    """Insert ``lines`` (whole table rows, each ending in a newline) above ``marker``,
    or append them when the marker is missing."""
    text = results.read_text() if results.exists() else ""
    if marker in text:
        text = text.replace(marker, lines + marker, 1)
    else:
        text += ("" if not text or text.endswith("\n") else "\n") + lines
    results.write_text(text)
