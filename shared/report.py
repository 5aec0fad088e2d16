"""Campaign reports: a Markdown page, a self-contained HTML page, a JSON dump and figures.

The scheduler gathers a :class:`ReportData` (one row per model family, the blends,
the confusion matrices and every unit) and calls :func:`write_report`, which writes

* ``confusion-<slug>.png`` for each confusion matrix (heatmaps like the study's Fig. 18-20),
* ``report.md`` (GitHub-flavoured Markdown tables, figures linked by file name),
* ``report.html`` (one HTML5 page, no external resources: the figures are embedded
  as ``data:`` URIs),
* ``report.json`` (``dataclasses.asdict`` of the data, sorted keys),

each through :mod:`shared.artifacts`, so a reader never sees half a file.

Accuracies are fractions in ``[0, 1]`` and are shown as percentages with three
decimals, as in the study (``0.84125`` -> ``84.125%``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.artifacts import WrittenFile, atomic_write_bytes, atomic_write_text

__all__ = [
    "FAILED_STATES",
    "BlendRow",
    "Confusion",
    "FamilyRow",
    "ReportData",
    "ReportFiles",
    "UnitSummary",
    "confusion_png",
    "figure_name",
    "render_html",
    "render_json",
    "render_markdown",
    "validate_slug",
    "write_report",
]

#: Unit states listed under "Failed units" (and highlighted in the HTML).
FAILED_STATES: frozenset[str] = frozenset({"FAILED", "FAILURE", "ERROR"})

#: Errors are cut to this many characters in the units table.
ERROR_CELL_CHARS = 120

_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DASH = "—"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class UnitSummary:
    key: str  # e.g. "quick-1a2b3c/cnn/5f3e2a1b9c0d/f2"
    family: str  # "cnn" | "svm" | "rf" (later maybe others)
    fold: int | None
    params: dict[str, Any]
    state: str  # "SUCCESS", "FAILED", "PENDING", ...
    worker: str | None
    seconds: float | None  # fit/train wall time
    train_acc: float | None
    val_acc: float | None
    test_acc: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class FamilyRow:
    """One row per model family: its best unit (by val_acc)."""

    family: str
    best_key: str
    params: dict[str, Any]
    units: int  # units of this family
    succeeded: int
    train_acc: float | None
    val_acc: float | None
    test_acc: float | None
    fit_seconds: float  # sum of the family's unit seconds


@dataclass(frozen=True, slots=True)
class BlendRow:
    """A blend of several units, e.g. "CNN 5-fold vote"."""

    name: str
    family: str
    method: str  # "vote"
    members: int
    test_acc: float | None


@dataclass(frozen=True, slots=True)
class Confusion:
    title: str  # e.g. "CNN 5-fold vote (test)", "SVM best point (test)"
    matrix: list[list[int]]  # rows = true class, columns = predicted class
    split: str  # "test" or "val"


@dataclass(frozen=True, slots=True)
class ReportData:
    campaign_id: str
    campaign_name: str
    created_at: str  # ISO timestamp string
    classes: tuple[str, ...]
    families: list[FamilyRow]
    blends: list[BlendRow]
    confusions: dict[str, Confusion]  # keyed by a file-name slug, e.g. "cnn", "svm", "rf"
    units: list[UnitSummary]


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: WrittenFile
    html: WrittenFile
    json: WrittenFile
    figures: dict[str, WrittenFile]  # slug -> confusion-<slug>.png


# --------------------------------------------------------------------------- helpers


def validate_slug(slug: str) -> str:
    """Return ``slug`` if it is a safe file-name part (``^[a-z0-9][a-z0-9_-]*$``)."""
    if not isinstance(slug, str) or not _SLUG_RE.fullmatch(slug):
        raise ValueError(f"invalid confusion slug {slug!r}: must match {_SLUG_RE.pattern}")
    return slug


def figure_name(slug: str) -> str:
    """The file name of the confusion figure for ``slug``: ``confusion-<slug>.png``."""
    return f"confusion-{validate_slug(slug)}.png"


def _is_failed(unit: UnitSummary) -> bool:
    return unit.state.upper() in FAILED_STATES


def _fmt_pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return _DASH
    return f"{value * 100:.3f}%"


def _fmt_duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 07 min``; ``None`` -> an em dash."""
    if seconds is None or not math.isfinite(seconds):
        return _DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs:02d} s"
    hours, rest = divmod(total, 3600)
    return f"{hours} h {rest // 60:02d} min"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, list | tuple | dict) else str(value)


def _fmt_params(params: Mapping[str, Any]) -> str:
    if not params:
        return _DASH
    return ", ".join(f"{k}={_fmt_value(params[k])}" for k in sorted(params, key=str))


def _fmt_opt(value: Any) -> str:
    return _DASH if value is None else str(value)


def _truncate(text: str | None, limit: int = ERROR_CELL_CHARS) -> str:
    if not text:
        return _DASH
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validate_matrix(matrix: Sequence[Sequence[int]], n_classes: int) -> None:
    if len(matrix) != n_classes or any(len(row) != n_classes for row in matrix):
        raise ValueError(
            f"confusion matrix must be {n_classes}x{n_classes} (one row and column per class)"
        )


# --------------------------------------------------------------------------- figure


def confusion_png(confusion: Confusion, classes: Sequence[str]) -> bytes:
    """A confusion-matrix heatmap as PNG bytes (400x400 px, deterministic for the same input).

    x-axis = predicted label, y-axis = true label, each cell annotated with its count
    (white on dark cells, black on light ones).
    """
    classes = [str(c) for c in classes]
    matrix = [[int(v) for v in row] for row in confusion.matrix]
    n = len(classes)
    _validate_matrix(matrix, n)

    fig = Figure(figsize=(4, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = max([1, *(v for row in matrix for v in row)])
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)

    ticks = list(range(n))
    long_names = max((len(c) for c in classes), default=0) > 6
    ax.set_xticks(
        ticks,
        labels=classes,
        rotation=45 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(confusion.title, fontsize=10)

    threshold = vmax / 2
    fontsize = 10 if n <= 6 else max(5, 10 - (n - 6))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if value > threshold else "black",
            )

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- markdown


def _md_text(text: str) -> str:
    """Plain text on one Markdown line: ``\\`` and ``<`` escaped (no raw HTML)."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("<", "\\<")


def _md_cell(text: str) -> str:
    """Plain text for a Markdown table cell: as :func:`_md_text`, and ``|`` escaped."""
    return _md_text(text).replace("|", "\\|")


def _md_fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_code(text: str, table: bool = True) -> str:
    """``text`` as an inline code span (``|`` escaped inside GFM tables)."""
    text = " ".join(str(text).split())
    if table:
        text = text.replace("|", "\\|")
    if not text:
        return _DASH
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if len(fence) > 1 else f"`{text}`"


def _md_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: set[int],
    code_cols: frozenset[int] = frozenset(),
) -> list[str]:
    """``rows`` hold plain text; cells are escaped here (``code_cols`` as code spans)."""

    def cell(i: int, text: str) -> str:
        if not text or text == _DASH:
            return _DASH
        return _md_code(text) if i in code_cols else _md_cell(text)

    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|")
    lines.extend("| " + " | ".join(cell(i, c) for i, c in enumerate(row)) + " |" for row in rows)
    return lines


_FAMILY_HEADER = (
    "Family",
    "Best unit",
    "Params",
    "Units (ok/total)",
    "Train acc",
    "Val acc",
    "Test acc",
    "Fit time",
)
_FAMILY_RIGHT = {3, 4, 5, 6, 7}
_BLEND_HEADER = ("Blend", "Method", "Members", "Test acc")
_BLEND_RIGHT = {2, 3}
_UNIT_HEADER = (
    "Key",
    "Family",
    "Fold",
    "State",
    "Worker",
    "Time",
    "Train acc",
    "Val acc",
    "Test acc",
    "Error",
)
_UNIT_RIGHT = {2, 5, 6, 7, 8}


def _family_cells(row: FamilyRow) -> list[str]:
    return [
        row.family,
        row.best_key or _DASH,
        _fmt_params(row.params),
        f"{row.succeeded}/{row.units}",
        _fmt_pct(row.train_acc),
        _fmt_pct(row.val_acc),
        _fmt_pct(row.test_acc),
        _fmt_duration(row.fit_seconds),
    ]


def _blend_cells(row: BlendRow) -> list[str]:
    return [row.name, row.method, str(row.members), _fmt_pct(row.test_acc)]


def _unit_cells(unit: UnitSummary) -> list[str]:
    return [
        unit.key,
        unit.family,
        _fmt_opt(unit.fold),
        unit.state,
        _fmt_opt(unit.worker),
        _fmt_duration(unit.seconds),
        _fmt_pct(unit.train_acc),
        _fmt_pct(unit.val_acc),
        _fmt_pct(unit.test_acc),
        _truncate(unit.error),
    ]


def render_markdown(data: ReportData, figure_names: Mapping[str, str]) -> str:
    """The report as GitHub-flavoured Markdown.

    ``figure_names`` maps each confusion slug to the figure's file name (relative to
    the Markdown file); a slug missing from it links ``confusion-<slug>.png``.
    """
    out: list[str] = [
        f"# orchard report — {_md_text(data.campaign_name)}",
        "",
        f"- Campaign: {_md_code(data.campaign_id)}",
        f"- Created: {_md_text(data.created_at)}",
        f"- Classes: {_md_text(', '.join(data.classes)) or _DASH}",
        f"- Units: {len(data.units)} ({sum(_is_failed(u) for u in data.units)} failed)",
        "",
        "## Model families",
        "",
    ]
    if data.families:
        rows = [_family_cells(r) for r in data.families]
        out += _md_table(_FAMILY_HEADER, rows, _FAMILY_RIGHT, code_cols=frozenset({1}))
    else:
        out.append("_No model families._")

    out += ["", "## Blending", ""]
    if data.blends:
        out += _md_table(_BLEND_HEADER, [_blend_cells(b) for b in data.blends], _BLEND_RIGHT)
    else:
        out.append("_No blends._")

    out += ["", "## Confusion matrices", ""]
    if data.confusions:
        for slug, confusion in data.confusions.items():
            name = figure_names.get(slug) or figure_name(slug)
            alt = " ".join(confusion.title.split()).replace("[", "\\[").replace("]", "\\]")
            out += [f"![{alt}]({name})", ""]
        out.pop()
    else:
        out.append("_No confusion matrices._")

    out += ["", "## Units", ""]
    if data.units:
        rows = [_unit_cells(u) for u in data.units]
        out += _md_table(_UNIT_HEADER, rows, _UNIT_RIGHT, code_cols=frozenset({0}))
    else:
        out.append("_No units._")

    failed = [u for u in data.units if _is_failed(u)]
    if failed:
        out += ["", "## Failed units", ""]
        for unit in failed:
            where = f" on {_md_text(unit.worker)}" if unit.worker else ""
            out.append(f"- {_md_code(unit.key, table=False)} ({_md_text(unit.state)}{where})")
            error = (unit.error or "(no error recorded)").rstrip()
            fence = _md_fence(error)
            lines = [f"  {line}".rstrip() for line in error.splitlines()]
            out += ["", f"  {fence}text", *lines, f"  {fence}", ""]
        out.pop()
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
:root { color-scheme: light; }
body {
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45;
}
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.failed, tbody tr.failed:nth-child(even) { background: #ffebe9; }
tr.failed td { color: #82071e; }
tr.partial, tbody tr.partial:nth-child(even) { background: #fff8c5; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { font-size: .85em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem; overflow-x: auto;
      white-space: pre-wrap; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; border: 1px solid #d0d7de; padding: .5rem; }
figure img { display: block; width: 400px; height: auto; }
figcaption { font-size: .85rem; text-align: center; margin-top: .3rem; }
.empty { color: #656d76; font-style: italic; }
""".strip()


def _h(text: Any) -> str:
    return escape(str(text), quote=True)


def _html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: set[int],
    row_classes: Sequence[str] | None = None,
    code_cols: frozenset[int] = frozenset(),
    title_cols: Mapping[int, Sequence[str]] | None = None,
) -> list[str]:
    """``rows`` hold plain text; everything is escaped here."""

    def cls(i: int) -> str:
        return ' class="num"' if i in right else ""

    out = ["<table>", "<thead><tr>"]
    out.append("".join(f"<th{cls(i)}>{_h(h)}</th>" for i, h in enumerate(header)))
    out += ["</tr></thead>", "<tbody>"]
    for r, row in enumerate(rows):
        rc = row_classes[r] if row_classes else ""
        cells = []
        for i, text in enumerate(row):
            body = f"<code>{_h(text)}</code>" if i in code_cols and text != _DASH else _h(text)
            title = ""
            if title_cols and i in title_cols and title_cols[i][r]:
                title = f' title="{_h(title_cols[i][r])}"'
            cells.append(f"<td{cls(i)}{title}>{body}</td>")
        out.append(
            f'<tr class="{rc}">' + "".join(cells) + "</tr>"
            if rc
            else "<tr>" + "".join(cells) + "</tr>"
        )
    out += ["</tbody>", "</table>"]
    return out


def render_html(data: ReportData, figures: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML5 page.

    ``figures`` maps each confusion slug to its PNG bytes, embedded as ``data:`` URIs;
    a confusion without a figure gets a placeholder. No external resources are used.
    """
    title = f"orchard report — {data.campaign_name}"
    failed = [u for u in data.units if _is_failed(u)]
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_h(title)}</h1>",
        '<dl class="meta">',
        f"<dt>Campaign</dt><dd><code>{_h(data.campaign_id)}</code></dd>",
        f"<dt>Created</dt><dd>{_h(data.created_at)}</dd>",
        f"<dt>Classes</dt><dd>{_h(', '.join(data.classes)) or _DASH}</dd>",
        f"<dt>Units</dt><dd>{len(data.units)} ({len(failed)} failed)</dd>",
        "</dl>",
        "<h2>Model families</h2>",
    ]
    if data.families:
        out += _html_table(
            _FAMILY_HEADER,
            [_family_cells(r) for r in data.families],
            _FAMILY_RIGHT,
            row_classes=["partial" if r.succeeded < r.units else "" for r in data.families],
            code_cols=frozenset({1}),
        )
    else:
        out.append('<p class="empty">No model families.</p>')

    out.append("<h2>Blending</h2>")
    if data.blends:
        out += _html_table(_BLEND_HEADER, [_blend_cells(b) for b in data.blends], _BLEND_RIGHT)
    else:
        out.append('<p class="empty">No blends.</p>')

    out.append("<h2>Confusion matrices</h2>")
    if data.confusions:
        out.append('<div class="figures">')
        for slug, confusion in data.confusions.items():
            png = figures.get(slug)
            if png is None:
                body = '<p class="empty">Figure not rendered.</p>'
            else:
                b64 = base64.b64encode(png).decode("ascii")
                body = f'<img alt="{_h(confusion.title)}" src="data:image/png;base64,{b64}">'
            out.append(
                f'<figure id="confusion-{_h(slug)}">{body}'
                f"<figcaption>{_h(confusion.title)}</figcaption></figure>"
            )
        out.append("</div>")
    else:
        out.append('<p class="empty">No confusion matrices.</p>')

    out.append("<h2>Units</h2>")
    if data.units:
        out += _html_table(
            _UNIT_HEADER,
            [_unit_cells(u) for u in data.units],
            _UNIT_RIGHT,
            row_classes=["failed" if _is_failed(u) else "" for u in data.units],
            code_cols=frozenset({0}),
            title_cols={9: [u.error or "" for u in data.units]},
        )
    else:
        out.append('<p class="empty">No units.</p>')

    if failed:
        out += ["<h2>Failed units</h2>", "<ul>"]
        for unit in failed:
            where = f" on {_h(unit.worker)}" if unit.worker else ""
            error = unit.error or "(no error recorded)"
            out.append(
                f"<li><code>{_h(unit.key)}</code> ({_h(unit.state)}{where})"
                f"<pre>{_h(error.rstrip())}</pre></li>"
            )
        out.append("</ul>")

    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- json


def _jsonable(value: Any) -> Any:
    """Plain JSON: str keys, NaN/inf -> None, tuples/sets -> lists, numpy values unwrapped."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy array
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


def render_json(data: ReportData) -> str:
    """``dataclasses.asdict(data)`` as JSON (sorted keys, indent 2, strictly valid JSON)."""
    return json.dumps(_jsonable(dataclasses.asdict(data)), sort_keys=True, indent=2) + "\n"


# --------------------------------------------------------------------------- write


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write the figures, ``report.md``, ``report.html`` and ``report.json`` into ``out_dir``.

    Every slug is validated before anything is written (``ValueError`` otherwise).
    """
    out_dir = Path(out_dir)
    names = {slug: figure_name(slug) for slug in data.confusions}
    pngs = {slug: confusion_png(c, data.classes) for slug, c in data.confusions.items()}

    figures = {slug: atomic_write_bytes(out_dir / names[slug], png) for slug, png in pngs.items()}
    markdown = atomic_write_text(out_dir / "report.md", render_markdown(data, names))
    html = atomic_write_text(out_dir / "report.html", render_html(data, pngs))
    json_file = atomic_write_text(out_dir / "report.json", render_json(data))
    return ReportFiles(markdown=markdown, html=html, json=json_file, figures=figures)
