"""Rich output for the CLI: text tables on stdout and a console for stderr.

On a terminal a table fits the window; in a pipe every row is one unwrapped line without trailing
spaces, so `grep`, `cut` and `split()` see whole cells. Nothing is read as Rich markup: a run named
``[bold]`` prints as typed.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 10_000  # wide enough that no cell is ever wrapped in a pipe


def stderr_console() -> Console:
    """The console for progress and log lines (stderr keeps stdout clean for scripts)."""
    return Console(stderr=True, markup=False, highlight=False, emoji=False)


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str] | None = None) -> None:
    """Columns separated by two spaces, a bold header row when ``headers`` is given."""
    table = Table(box=None, show_header=headers is not None, pad_edge=False, header_style="bold", padding=(0, 2, 0, 0))
    for i, h in enumerate(headers or [""] * len(rows[0])):
        last = i == len(rows[0]) - 1
        table.add_column(h, no_wrap=not last, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out = Console(markup=False, highlight=False, emoji=False)
    if out.is_terminal:
        out.print(table)
        return
    buf = io.StringIO()
    Console(file=buf, width=PIPE_WIDTH, markup=False, highlight=False, emoji=False, color_system=None).print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines()))
    sys.stdout.flush()
