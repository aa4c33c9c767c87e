"""The CLI's tables, readable at any terminal width.

A table whose columns cannot all show their names at the terminal's width (an 80-column
terminal and `ordermill show`'s ten item columns) is not squeezed until every heading reads
"stat…": it is printed as records instead, one block per row, each value under its column's
name and wrapped to the width. Cells and titles are plain text (a client's or a server's
words are not markup), their control characters shown escaped (views.printable)."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from cli.views import printable


def _cell(value: object) -> Text:
    return Text(printable(value, multiline=True))


def grid(title: str, columns: list[str], rows: list[list[object]]) -> Table:
    t = Table(title=Text(printable(title)), title_justify="left")
    for column in columns:
        # A heading is never cut: a column is at least as wide as its name.
        t.add_column(column, min_width=len(column), overflow="fold")
    for row in rows:
        t.add_row(*(_cell(v) for v in row))
    return t


def records(title: str, columns: list[str], rows: list[list[object]]) -> Group:
    """Each row as a block: its first column as the heading, then its other values (empty
    ones left out) beside their names, wrapped with a hanging indent."""
    parts: list[RenderableType] = [Text(printable(title), style="italic")]
    if not rows:
        parts.append(Text("  (none)", style="dim"))
    for row in rows:
        parts.append(Text.assemble(("  " + columns[0] + " ", "dim"),
                                   (printable(row[0], multiline=True), "bold")))
        block = Table.grid(padding=(0, 2))
        block.add_column(style="dim", justify="right", no_wrap=True)
        block.add_column(overflow="fold")
        for name, value in zip(columns[1:], row[1:], strict=True):
            if value is not None and value != "":
                block.add_row(name, _cell(value))
        parts.append(Padding(block, (0, 0, 0, 4)))
    return Group(*parts, Text(""))


def table(console: Console, title: str, columns: list[str],
          rows: list[list[object]]) -> RenderableType:
    """A grid when every column fits the console's width with its name whole; records
    otherwise."""
    t = grid(title, columns, rows)
    # Measured unclamped (Measurement.get caps at the width it is given).
    needed = Measurement.get(console, console.options.update(max_width=100_000), t).minimum
    return t if needed <= console.width else records(title, columns, rows)
