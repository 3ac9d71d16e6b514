"""Progress of long work (building or loading a large model, measuring caches): the library reports,
the command line renders.

Library code calls :func:`advance` with the amount of work it just finished (bytes initialised
or read, models measured); it costs nothing when no bar is shown. The CLI opens a bar with
:func:`bar`, a rich progress bar on stderr, shown only when stderr is a terminal and output is
not ``--json``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar = ContextVar("ctxlab_progress", default=None)


def advance(amount: float = 1) -> None:
    """Report ``amount`` of finished work to the bar that is showing, if any."""
    current = _current.get()
    if current is not None:
        current(amount)


@contextmanager
def bar(description: str, total: float, show: bool = True, unit_bytes: bool = False) -> Iterator[None]:
    """Show a progress bar on stderr while the block runs (when ``show`` and stderr is a terminal)."""
    if not (show and sys.stderr.isatty()):
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    counter = DownloadColumn(binary_units=True) if unit_bytes else MofNCompleteColumn()
    columns = (TextColumn("{task.description}"), BarColumn(), counter, TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task(description, total=total)
        token = _current.set(lambda amount: progress.advance(task, amount))
        try:
            yield
        finally:
            _current.reset(token)
