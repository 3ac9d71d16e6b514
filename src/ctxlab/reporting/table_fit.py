"""Tables that fit the terminal without cutting a model's name.

The name column never wraps or truncates (its minimum width is its longest name). Other columns
wrap; when the table still cannot fit, whole columns are dropped, least important first, and the
caption says which (``--json`` has everything).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 160  # output to a pipe or file: wide enough for every table, unless COLUMNS says otherwise


def console_width() -> int | None:
    """``COLUMNS`` when set, else the terminal's width (None: rich asks it), else :data:`PIPE_WIDTH`."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if sys.stdout.isatty() else PIPE_WIDTH


def add_name_column(table: Table, header: str, names: list[str]) -> None:
    """The column of model names: never wrapped, never truncated."""
    width = max([len(header), *(len(n) for n in names)])
    table.add_column(header, no_wrap=True, min_width=width, overflow="fold")


NAME_HEADERS = ("Model", "Name", "Family preset", "Baseline")


def fit(table: Table, console: Console, drop_order: list[str] | None = None) -> Table:
    """The name columns made unbreakable; then the columns in ``drop_order`` (first = least important;
    default: from the right, name columns kept) dropped until the table fits the console."""
    if drop_order is None:
        drop_order = [c.header for c in reversed(table.columns) if c.header not in NAME_HEADERS]
    for column in table.columns:
        if column.header in NAME_HEADERS:
            column.no_wrap = True
            column.min_width = max([len(str(column.header)), *(len(str(c)) for c in column._cells)])
    dropped = []
    for header in drop_order:
        if _minimum_width(table, console) <= console.width:
            break
        index = next((i for i, c in enumerate(table.columns) if c.header == header), None)
        if index is not None:
            table.columns.pop(index)
            dropped.append(header)
    _set_widths(table, console)
    if dropped:
        note = (
            f"columns left out at {console.width} terminal columns: {', '.join(dropped)} "
            "(widen the terminal, set COLUMNS, or use --json)"
        )
        table.caption = f"{table.caption}\n{note}" if table.caption else note
    return table


def _set_widths(table: Table, console: Console) -> None:
    """When the table is wider than the console, fix every column's width: its longest word, plus a
    share of the space left in proportion to how much more it could use (rich alone would cut words)."""
    wide = console.options.update_width(1 << 20)
    sizes = [table._measure_column(console, wide, c) for c in table.columns]
    spare = console.width - table._extra_width - sum(m.minimum for m in sizes)
    wants = [m.maximum - m.minimum for m in sizes]
    if sum(m.maximum for m in sizes) + table._extra_width <= console.width or spare < 0:
        return
    given = [spare * w // max(sum(wants), 1) for w in wants]
    for column, m, extra in zip(table.columns, sizes, given):
        padding = table._get_padding_width(column._index)
        column.width = m.minimum + extra - padding


def _minimum_width(table: Table, console: Console) -> int:
    """The narrowest the table can be without cutting a word: each column as wide as its longest word
    (its whole text for the name column), plus padding and borders (rich's own measure is capped at the
    console width, so it cannot say when a table does not fit)."""
    wide = console.options.update_width(1 << 20)
    return sum(table._measure_column(console, wide, c).minimum for c in table.columns) + table._extra_width
