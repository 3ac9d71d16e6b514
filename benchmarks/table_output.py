"""One way for the benchmark scripts to print their result table: markdown (for docs/benchmarks.md)
or a rich table (for a terminal)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_table(title: str, cols: list[str], rows: list[list[str]], markdown: bool, left: tuple[str, ...] = ()) -> None:
    """``rows`` of already formatted cells under ``cols``; columns named in ``left`` are left-aligned."""
    if markdown:
        print(f"\n{title}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
