"""Where a command's output goes: rich tables and progress bars on a terminal, plain
lines (tab-separated for tables) when stdout is a pipe or a file."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


class Output:
    """stdout for results and progress, stderr for errors."""

    def __init__(self) -> None:
        # Rich's own test: a terminal, or FORCE_COLOR / TTY_COMPATIBLE set.
        self.console = Console(highlight=False)
        self.is_terminal = self.console.is_terminal

    def line(self, text: str) -> None:
        if self.is_terminal:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table on a terminal; one tab-separated line per row, no header, otherwise."""
        if not self.is_terminal:
            for row in rows:
                print("\t".join(cell.replace("\t", " ") for cell in row), flush=True)
            return
        table = Table(*headers, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)
