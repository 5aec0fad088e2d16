"""Campaign reports in the study's shapes: Markdown, one self-contained HTML page, JSON.

The report task gathers a :class:`ReportData` from the store and calls
:func:`write_report`, which writes into one folder

* the figures, PNG via matplotlib's Agg canvas: ``confusion-<slug>.png`` (Fig. 18-20),
  ``curve-<slug>.png`` (learning curves, Fig. 2-7), ``sweep-<slug>.png`` (a metric
  against a swept parameter, Fig. 12-17), ``tsne-svm.png`` (the SVM's features in 2-D,
  section 2.4.2), ``lime-<slug>.png`` (section 1.5) and ``timeline.png`` (units across
  workers),
* ``submission.csv`` when the test set is unlabelled (``image_id,label``),
* ``report.md`` (GitHub-flavoured Markdown, figures linked by file name),
* ``report.html`` (one HTML5 page with no external resources: figures are ``data:`` URIs),
* ``report.json`` (``dataclasses.asdict`` of the data, sorted keys, images left out),

each through :mod:`shared.artifacts`, so a reader never sees half a file.

Both pages are rendered from one list of blocks (:func:`document`), so they always
have the same sections. Accuracies are fractions in ``[0, 1]`` shown as percentages
with three decimals, as in the study (``0.84125`` -> ``84.125%``). Nothing here knows
which parameters a family has: the tables show whichever ones vary across its points.

The package's modules, each using only those before it: :mod:`~shared.report.model`
(the data, the tables' limits, how parameters are named), :mod:`~shared.report.figures`,
:mod:`~shared.report.document` (the blocks, the CSVs of cut tables) and
:mod:`~shared.report.render` (the files, :func:`write_report`).
"""

from __future__ import annotations

from shared.report.document import (
    document,
    experiments_csv_name,
    table_csvs,
    validation_line,
)
from shared.report.figures import (
    confusion_png,
    curve_png,
    lime_png,
    sweep_png,
    timeline_colors,
    timeline_png,
    tsne_png,
)
from shared.report.model import (
    FAILED_STATES,
    FAMILY_TITLES,
    MAX_FAILED_LISTED,
    MAX_POINT_ROWS,
    MAX_SWEEP_TICKS,
    MAX_UNIT_ROWS,
    SECTION_HEADINGS,
    BlendRow,
    Confusion,
    CurveFigure,
    Experiment,
    FamilyRow,
    LimeItem,
    LimeSection,
    PointRow,
    PreprocessingSummary,
    ReportData,
    ReportFiles,
    SkippedInput,
    Submission,
    SweepPlot,
    TimelineBar,
    TsneSection,
    UnitSummary,
    family_title,
    figure_name,
    param_label,
    param_value,
    point_rank,
    swept_params,
    validate_slug,
)
from shared.report.render import (
    render_html,
    render_json,
    render_markdown,
    submission_csv,
    write_report,
)

__all__ = [
    "BlendRow",
    "Confusion",
    "CurveFigure",
    "Experiment",
    "FAILED_STATES",
    "FAMILY_TITLES",
    "FamilyRow",
    "LimeItem",
    "LimeSection",
    "MAX_FAILED_LISTED",
    "MAX_POINT_ROWS",
    "MAX_SWEEP_TICKS",
    "MAX_UNIT_ROWS",
    "PointRow",
    "PreprocessingSummary",
    "ReportData",
    "ReportFiles",
    "SECTION_HEADINGS",
    "SkippedInput",
    "Submission",
    "SweepPlot",
    "TimelineBar",
    "TsneSection",
    "UnitSummary",
    "confusion_png",
    "curve_png",
    "document",
    "experiments_csv_name",
    "family_title",
    "figure_name",
    "lime_png",
    "param_label",
    "param_value",
    "point_rank",
    "render_html",
    "render_json",
    "render_markdown",
    "submission_csv",
    "sweep_png",
    "swept_params",
    "table_csvs",
    "timeline_colors",
    "timeline_png",
    "tsne_png",
    "validate_slug",
    "validation_line",
    "write_report",
]
