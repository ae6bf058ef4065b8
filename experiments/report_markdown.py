"""The report's Markdown pieces (`experiments.reporting`): cells, tables, wrapped paragraphs
and paths as shown, shared by its tables (`paper_tables`, `ablation_report`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

WIDTH = 95  # paragraph lines wrap here (table rows, headings and markers are kept whole)


def display(path: Path) -> str:
    """A path as the report shows it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def pct(value: float | None, ci: float | None = None, bold: bool = False) -> str:
    """A fraction in percent with two decimals (`+- ci` beside it); "" for None."""
    if value is None:
        return ""
    text = f"{100 * value:.2f}"
    text = f"**{text}**" if bold else text
    return text if ci is None else f"{text} +- {100 * ci:.2f}"


def count(value: Any) -> str:
    """An integer with thousands separators; "" for None."""
    return "" if value is None else f"{int(value):,}"


def duration(seconds: Any) -> str:
    """Seconds as `1h02m`, `5m00s`, ...; "" for None."""
    from metanet_jax.logging_utils import format_duration

    return "" if seconds is None else format_duration(float(seconds))


def code(text: str | None) -> str:
    """`text` as inline code; "" for none."""
    return f"`{text}`" if text else ""


def wrap(lines: Sequence[str]) -> list[str]:
    """Paragraph lines wrapped at `WIDTH` characters (table rows, headings and markers kept)."""
    import textwrap

    out = []
    for line in lines:
        if len(line) <= WIDTH or line.startswith(("|", "#", "<!--")):
            out.append(line)
        else:
            out += textwrap.wrap(line, width=WIDTH, break_long_words=False, break_on_hyphens=False)
    return out


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
