"""The report's files: Markdown, one self-contained HTML page, JSON, ``submission.csv``,
and :func:`write_report`, which writes them all into one folder."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from shared.artifacts import atomic_write_bytes, atomic_write_text
from shared.errors import visible_controls
from shared.report.document import (
    Bullets,
    Code,
    ErrorList,
    Figures,
    Heading,
    Inline,
    Para,
    Quote,
    Strong,
    Table,
    document,
    table_csvs,
)
from shared.report.figures import _figure_renderers
from shared.report.model import (
    _DASH,
    SUBMISSION_FILE,
    ReportData,
    ReportFiles,
    Submission,
)

# --------------------------------------------------------------------------- markdown


#: What makes a line a heading, a quote, a list item, a rule or a code fence in
#: Markdown (``*`` and ````` are escaped everywhere already).
_MD_BLOCK_START = re.compile(r"#{1,6}(?:\s|$)|>|[-+](?:\s|$)|(?:[-_]\s*){3,}$|~{3,}")
#: An ordered list item's number: the ``.`` or ``)`` after it is what is escaped.
_MD_ORDERED_START = re.compile(r"\d{1,9}(?=[.)](?:\s|$))")


def _md_text(text: str) -> str:
    """Plain text on one Markdown line: ``\\``, ``<``, ``&``, ``*``, `````, ``[`` and ``]``
    escaped: no raw HTML or entity (a class ``A&amp;B`` shown as ``A&B``), no code span,
    and no link or image (a title ``![x](https://host/p.png)`` would make a Markdown
    viewer fetch it)."""
    text = " ".join(str(text).split()).replace("\\", "\\\\").replace("<", "\\<")
    text = text.replace("&", "\\&").replace("`", "\\`")
    return text.replace("*", "\\*").replace("[", "\\[").replace("]", "\\]")


def _md_line_start(text: str) -> str:
    """Markdown text (:func:`_md_text`'s) that starts a line or a list item, with what
    would make it a heading, quote, list, rule or fence there escaped: a description
    ``# Accuracy 99.9%`` made a headline of the report."""
    if number := _MD_ORDERED_START.match(text):
        return f"{text[: number.end()]}\\{text[number.end() :]}"
    return f"\\{text}" if _MD_BLOCK_START.match(text) else text


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


def _md_inline(parts: Sequence[Inline]) -> str:
    """``parts`` as the Markdown of a paragraph or list item, which they start."""
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(_md_code(part.text, table=False))
        elif isinstance(part, Strong):
            out.append(f"**{_md_text(part.text)}**")
        else:
            lead = " " if part[:1].isspace() else ""
            trail = " " if part[-1:].isspace() and part.strip() else ""
            out.append(lead + _md_text(part) + trail)
    return _md_line_start("".join(out))


def _md_table(table: Table) -> list[str]:
    def cell(r: int, i: int, text: str) -> str:
        if not text or text == _DASH:
            return _DASH
        body = _md_code(text) if i in table.code_cols else _md_cell(text)
        best = table.row_classes is not None and table.row_classes[r] == "best"
        return f"**{body}**" if best else body

    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |"]
    lines.append(
        "|"
        + "|".join("---:" if i in table.right else "---" for i in range(len(table.header)))
        + "|"
    )
    lines.extend(
        "| " + " | ".join(cell(r, i, c) for i, c in enumerate(row)) + " |"
        for r, row in enumerate(table.rows)
    )
    return lines


def render_markdown(data: ReportData, captions: Mapping[str, str] | None = None) -> str:
    """The report as GitHub-flavoured Markdown; figures are linked by file name. It
    holds no control character but newlines and tabs (:func:`~shared.errors.visible_controls`:
    it is printed to terminals by ``orchard report ID --print``)."""
    if captions is None:
        captions = {name: caption for name, (caption, _) in _figure_renderers(data).items()}
    title, blocks = document(data)
    out: list[str] = [f"# {_md_text(title)}"]
    for block in blocks:
        out.append("")
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, Para):
            text = _md_inline(block.parts)
            out.append(f"_{text}_" if block.empty else text)
        elif isinstance(block, Table):
            out += _md_table(block)
        elif isinstance(block, Figures):
            for name in block.names:
                alt = " ".join(captions.get(name, name).split())
                alt = alt.replace("[", "\\[").replace("]", "\\]")
                out += [f"![{alt}]({name})", ""]
            out.pop()
        elif isinstance(block, Quote):
            out += [f"> {line}".rstrip() for line in block.markdown.strip().splitlines()]
        elif isinstance(block, Bullets):
            out += [f"- {_md_inline(item)}" for item in block.items]
        elif isinstance(block, ErrorList):
            for what, error in block.items:
                fence = _md_fence(error)
                lines = [f"  {line}".rstrip() for line in error.rstrip().splitlines()]
                out += [f"- {_md_inline(what)}", "", f"  {fence}text", *lines, f"  {fence}", ""]
            out.pop()
    return visible_controls("\n".join(out)) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
:root { color-scheme: light; }
body {
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45;
}
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05rem; margin-top: 1.2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.best td { font-weight: 700; }
tr.failed, tbody tr.failed:nth-child(even) { background: #ffebe9; }
tr.failed td { color: #82071e; }
tr.partial, tbody tr.partial:nth-child(even) { background: #fff8c5; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { font-size: .85em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem; overflow-x: auto;
      white-space: pre-wrap; }
blockquote { border-left: 4px solid #d0d7de; margin: .5rem 0; padding: .1rem 1rem;
             color: #424a53; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; border: 1px solid #d0d7de; padding: .5rem; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: .85rem; text-align: center; margin-top: .3rem; }
.empty { color: #656d76; font-style: italic; }
nav.contents ul { display: flex; flex-wrap: wrap; gap: .2rem 1.2rem; list-style: none;
                  padding: 0; margin: .5rem 0 1rem; font-size: .9rem; }
""".strip()


def section_ids(blocks: Sequence[Any]) -> dict[int, str]:
    """An ``id`` for each ``##`` heading (by its index in ``blocks``): ``section-`` and
    its words, so that no figure's id (``timeline``, ``lime-cnn``) can equal one, and a
    heading that comes twice gets ``-2``."""
    ids: dict[int, str] = {}
    taken: set[str] = set()
    for i, block in enumerate(blocks):
        if isinstance(block, Heading) and block.level == 2:
            base = "section-" + ("-".join(re.findall(r"[a-z0-9]+", block.text.lower())) or "x")
            anchor, n = base, 1
            while anchor in taken:
                n += 1
                anchor = f"{base}-{n}"
            taken.add(anchor)
            ids[i] = anchor
    return ids


def _h(text: Any) -> str:
    return escape(str(text), quote=True)


def _html_inline(parts: Sequence[Inline]) -> str:
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(f"<code>{_h(part.text)}</code>")
        elif isinstance(part, Strong):
            out.append(f"<strong>{_h(part.text)}</strong>")
        else:
            out.append(_h(part))
    return "".join(out)


def _html_markdown(text: str) -> str:
    """The little Markdown a note uses: paragraphs, ``code`` and **bold**, all escaped."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out = []
    for paragraph in paragraphs:
        html = _h(" ".join(paragraph.split()))
        html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
        html = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)
        out.append(f"<p>{html}</p>")
    return "".join(out)


def _html_table(table: Table) -> list[str]:
    def cls(i: int) -> str:
        return ' class="num"' if i in table.right else ""

    out = ["<table>", "<thead><tr>"]
    out.append("".join(f"<th{cls(i)}>{_h(h)}</th>" for i, h in enumerate(table.header)))
    out += ["</tr></thead>", "<tbody>"]
    for r, row in enumerate(table.rows):
        rc = table.row_classes[r] if table.row_classes else ""
        cells = []
        for i, text in enumerate(row):
            code = i in table.code_cols and text != _DASH
            body = f"<code>{_h(text)}</code>" if code else _h(text)
            title = ""
            if table.titles and i in table.titles and table.titles[i][r]:
                title = f' title="{_h(table.titles[i][r])}"'
            cells.append(f"<td{cls(i)}{title}>{body}</td>")
        opening = f'<tr class="{rc}">' if rc else "<tr>"
        out.append(opening + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return out


def render_html(
    data: ReportData,
    figures: Mapping[str, bytes],
    captions: Mapping[str, str] | None = None,
) -> str:
    """The report as one self-contained HTML5 page.

    ``figures`` maps figure file names to PNG bytes, embedded as ``data:`` URIs; a
    figure that is missing gets a placeholder. No external resources are used.
    """
    if captions is None:
        captions = {name: caption for name, (caption, _) in _figure_renderers(data).items()}
    title, blocks = document(data)
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
    ]
    anchors = section_ids(blocks)
    if len(anchors) > 1:  # the sections' names, each a link: a long report's contents
        out.append('<nav class="contents" aria-label="Contents"><ul>')
        out += [f'<li><a href="#{a}">{_h(blocks[i].text)}</a></li>' for i, a in anchors.items()]
        out.append("</ul></nav>")
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            anchor = f' id="{anchors[i]}"' if i in anchors else ""
            out.append(f"<h{block.level}{anchor}>{_h(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="empty"' if block.empty else ""
            out.append(f"<p{cls}>{_html_inline(block.parts)}</p>")
        elif isinstance(block, Table):
            out += _html_table(block)
        elif isinstance(block, Figures):
            out.append('<div class="figures">')
            for name in block.names:
                caption = captions.get(name, name)
                png = figures.get(name)
                if png is None:
                    body = '<p class="empty">Figure not rendered.</p>'
                else:
                    b64 = base64.b64encode(png).decode("ascii")
                    body = f'<img alt="{_h(caption)}" src="data:image/png;base64,{b64}">'
                stem = name.removesuffix(".png")
                out.append(
                    f'<figure id="{_h(stem)}">{body}<figcaption>{_h(caption)}</figcaption></figure>'
                )
            out.append("</div>")
        elif isinstance(block, Quote):
            out.append(f"<blockquote>{_html_markdown(block.markdown)}</blockquote>")
        elif isinstance(block, Bullets):
            out.append("<ul>")
            out += [f"<li>{_html_inline(item)}</li>" for item in block.items]
            out.append("</ul>")
        elif isinstance(block, ErrorList):
            out.append("<ul>")
            out += [
                f"<li>{_html_inline(what)}<pre>{_h(error.rstrip())}</pre></li>"
                for what, error in block.items
            ]
            out.append("</ul>")
    out += ["</body>", "</html>"]
    # a browser obeys a right-to-left override in a title as a terminal does an ESC
    # (`cat report.html`): shown escaped, as in report.md
    return visible_controls("\n".join(out)) + "\n"


# --------------------------------------------------------------------------- json, csv


def _jsonable(value: Any) -> Any:
    """Plain JSON: str keys, NaN/inf -> None, tuples/sets -> lists, numpy values unwrapped,
    dataclasses as dicts of their fields (one walk: ``dataclasses.asdict`` first copied
    everything deeply, a third of a big report's writing)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
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
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy array
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


def render_json(data: ReportData) -> str:
    """``dataclasses.asdict(data)`` as JSON (sorted keys, indent 2, strictly valid JSON).

    LIME's images and the t-SNE map's points are figures, not data: each becomes its
    shape.
    """
    if data.lime is not None and data.lime.items:
        items = [
            dataclasses.replace(
                item,
                image=list(getattr(item.image, "shape", ())),
                overlay=list(getattr(item.overlay, "shape", ())),
            )
            for item in data.lime.items
        ]
        data = dataclasses.replace(data, lime=dataclasses.replace(data.lime, items=items))
    if data.tsne is not None and data.tsne.drawn:
        tsne = dataclasses.replace(
            data.tsne,
            xy=list(getattr(data.tsne.xy, "shape", (len(data.tsne.xy), 2))),
            labels=list(getattr(data.tsne.labels, "shape", (len(data.tsne.labels),))),
        )
        data = dataclasses.replace(data, tsne=tsne)
    return json.dumps(_jsonable(data), sort_keys=True, indent=2) + "\n"


def submission_csv(submission: Submission) -> str:
    """``image_id,label`` and one row per test image, as the competition expects."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "label"])
    writer.writerows(submission.rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- write


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write the figures, ``submission.csv``, ``report.md``, ``report.html``,
    ``report.json`` and the CSVs of the tables the page cuts (:func:`table_csvs`) into
    ``out_dir``.

    Every slug is validated and every figure drawn before anything is written
    (``ValueError`` otherwise), so a bad input leaves no half report behind.
    """
    out_dir = Path(out_dir)
    renderers = _figure_renderers(data)
    captions = {name: caption for name, (caption, _) in renderers.items()}
    pngs = {name: render() for name, (_, render) in renderers.items()}
    markdown_text = render_markdown(data, captions)
    html_text = render_html(data, pngs, captions)
    json_text = render_json(data)
    csvs = table_csvs(data)

    figures = {name: atomic_write_bytes(out_dir / name, png) for name, png in pngs.items()}
    tables = {name: atomic_write_text(out_dir / name, text) for name, text in csvs.items()}
    submission = None
    if data.submission is not None:
        submission = atomic_write_text(out_dir / SUBMISSION_FILE, submission_csv(data.submission))
    return ReportFiles(
        markdown=atomic_write_text(out_dir / "report.md", markdown_text),
        html=atomic_write_text(out_dir / "report.html", html_text),
        json=atomic_write_text(out_dir / "report.json", json_text),
        figures=figures,
        submission=submission,
        tables=tables,
    )
