"""Tables on a terminal or in a pipe: on a terminal a rich table fitted to its width
(words wrap, columns a narrow one can spare are left out); piped, plain columns, every
column, one line per row."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported where a table is drawn: a piped command needs none
    from rich.console import Console
    from rich.table import Table


def print_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: list[list[str]],
    *,
    whole: str | None = None,
    drops: Sequence[str] = (),
) -> None:
    """A rich table on a terminal; plain columns when the output is not a terminal (a
    pipe, a file: no box characters, no width limit, every column, one line per row).

    The cells of the ``whole`` column are never cut or folded (a campaign id is copied
    into the next command). The other columns wrap between words to fit the terminal;
    where even that is too wide the ``drops`` columns are left out one by one, and a
    terminal too narrow for the rest gets plain columns, without the ``drops``.
    """
    if whole is None:
        if console.is_terminal:
            console.print(rich_table(title, columns, rows))
        else:
            print(plain_table(title, columns, rows))
        return
    if not console.is_terminal:
        print(plain_table(title, columns, rows))
        return
    if (table := first_fitting_table(console, title, columns, rows, whole, drops)) is not None:
        console.print(table)
        return
    # No table fits, even without the drops columns: plain columns without them (a table
    # is at most a few characters wider than plain columns of the same cells, since its
    # cells wrap, so plain columns would not fit with any of the drops either).
    index = [i for i, name in enumerate(columns) if name not in drops]
    print(
        plain_table(title, [columns[i] for i in index], [[row[i] for i in index] for row in rows])
    )
    if drops:
        hidden = [name for name in columns if name in drops]
        print(f"not shown at this width: {', '.join(hidden)}")


def plain_table(title: str, columns: Sequence[str], rows: list[list[str]]) -> str:
    """The title, then one line per row, columns aligned by spaces; an empty cell is ``-``
    so that every line has as many words per column. A character the output's encoding
    lacks is escaped here, before the widths are taken (``\\xe9`` is four columns), and
    a wide one (CJK) counts as two."""
    from rich.cells import cell_len

    escape = _escaper(getattr(sys.stdout, "encoding", None))
    cells = [list(columns)] + [
        [escape(" ".join(cell.split())) or "-" for cell in row] for row in rows
    ]
    widths = [max(cell_len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            cell + " " * (w - cell_len(cell)) for cell, w in zip(line, widths, strict=True)
        ).rstrip()
        for line in cells
    ]
    return "\n".join([title, *lines])


def _escaper(encoding: str | None) -> Callable[[str], str]:
    """What the output will show for a text: as it is, or with the characters
    ``encoding`` lacks escaped (as the output's ``backslashreplace`` would)."""
    try:
        codecs.lookup(encoding or "utf-8")
    except LookupError:
        return lambda text: text
    codec = encoding or "utf-8"
    return lambda text: text.encode(codec, "backslashreplace").decode(codec)


def rich_table(
    title: str,
    columns: Sequence[str],
    rows: list[list[str]],
    widths: Sequence[int | None] | None = None,
    caption: str | None = None,
) -> Table:
    from rich.table import Table
    from rich.text import Text

    # every string as Text, which rich prints as it is: a str is read as console markup,
    # and a file name or error holding "[/x]" (a dataset's folder names) stopped the
    # command with a MarkupError, while "[link=…]" or "[conceal]" in one acted
    table = Table(
        title=Text(title, style="table.title"),
        caption=Text(caption, style="table.caption") if caption is not None else None,
    )
    for column, width in zip(columns, widths or [None] * len(columns), strict=True):
        # with a width given, every word fits it: cells wrap between words
        table.add_column(Text(column), overflow="fold", width=width)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def first_fitting_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: list[list[str]],
    whole: str | None,
    drops: Sequence[str],
    folds: str | None = None,
) -> Table | None:
    """:func:`fitted_table` of every column, else without the first of ``drops``, then
    the next too, ...: the first that fits the console; None if none does."""
    shown = list(columns)
    for drop in (None, *drops):
        if drop is not None:
            shown.remove(drop)
        if (table := fitted_table(console, title, columns, rows, shown, whole, folds)) is not None:
            return table
    return None


def fitted_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: list[list[str]],
    shown: Sequence[str],
    whole: str | None,
    folds: str | None = None,
) -> Table | None:
    """The table of the ``shown`` columns at the console's width, the ``whole`` column
    at its full width and no other word cut but in the ``folds`` column (long messages:
    at least ``FOLDED_WIDTH`` wide); None if it cannot be that narrow."""
    from rich.measure import Measurement

    index = [columns.index(name) for name in shown]
    cells = [[name] + [row[i] for row in rows] for name, i in zip(shown, index, strict=True)]
    natural = [max(len(cell) for cell in column) for column in cells]
    least = [
        n
        if name == whole
        else min(n, FOLDED_WIDTH)
        if name == folds
        else max(len(word) for cell in column for word in cell.split() or [""])
        for name, n, column in zip(shown, natural, cells, strict=True)
    ]
    hidden = [name for name in columns if name not in shown]
    caption = f"not shown at this width: {', '.join(hidden)}" if hidden else None
    sub = [[row[i] for i in index] for row in rows]
    table = rich_table(title, shown, sub, natural, caption)
    wide = console.options.update_width(10**6)
    excess = Measurement.get(console, wide, table).maximum - console.width
    if excess > sum(natural) - sum(least):
        return None
    widths = list(natural)
    while excess > 0:  # narrow the widest column that can still wrap, one step at a time
        i = max((i for i in range(len(widths)) if widths[i] > least[i]), key=lambda i: widths[i])
        widths[i] -= 1
        excess -= 1
    return rich_table(title, shown, sub, widths, caption)


#: The least width of a column of messages whose words may be cut (a path, an error).
FOLDED_WIDTH = 12
