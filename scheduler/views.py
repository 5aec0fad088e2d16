"""What ``orchard status`` shows: the campaign list, a campaign's units (their notes:
the epoch a fold is at, a lease run out, an earlier run), their JSON, and the cut of a
long unit table that a terminal can hold."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `orchard status --json` needs no rich
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

    from db.store import Campaign, EarlierAttempt, Result, Store, Unit

from scheduler.tables import first_fitting_table, plain_table, rich_table
from shared.errors import visible_controls
from shared.settings import mask_url
from shared.times import as_utc

Rows = tuple[str, Sequence[str], list[list[str]]]  # title, column names, rows of cells

#: Columns of ``orchard status`` that a narrow terminal leaves out, first to last: the
#: campaign id already holds the name and the creation time, and a cancelled campaign
#: says so in its state.
NARROW_DROPS = ("created", "name", "cancelled")


def print_units(console: Console, rows: Rows) -> None:
    """A campaign's unit table: on a terminal the units it can show, fitted to its width;
    piped, every unit in plain columns."""
    if console.is_terminal:
        console.print(units_renderable(console, *terminal_rows(rows)))
    else:
        print(plain_table(*rows))


#: Columns of a campaign's unit table that a narrow terminal leaves out, first to last;
#: the unit's key is never cut, its message may be.
UNIT_DROPS = ("worker", "tries", "seconds", "val acc")
UNIT_FOLDS = "progress / error"


def units_renderable(
    console: Console, title: str, columns: Sequence[str], rows: list[list[str]]
) -> Table:
    """A campaign's unit table on a terminal: the keys whole, the messages folded, the
    ``UNIT_DROPS`` columns left out while it is too wide; where even that does not fit,
    the rest as rich lays them out (every column folded)."""
    drops = [name for name in UNIT_DROPS if name in columns]
    table = first_fitting_table(console, title, columns, rows, "unit", drops, UNIT_FOLDS)
    if table is not None:
        return table
    index = [i for i, name in enumerate(columns) if name not in drops]
    shown = [columns[i] for i in index]
    caption = f"not shown at this width: {', '.join(drops)}"
    return rich_table(title, shown, [[row[i] for i in index] for row in rows], caption=caption)


def campaign_rows(store: Store, campaigns: Sequence[Campaign]) -> Rows:
    from shared.plan import CANCELLED, FAILED, RUNNING, SUCCESS

    columns = (
        "id", "name", "state", "units done/total", "failed", "cancelled", "running", "created"
    )  # fmt: skip
    rows = []
    counts = store.unit_counts([c.id for c in campaigns])  # one query for the whole list
    for campaign in campaigns:
        states = Counter(counts.get(campaign.id, {}))
        rows.append(
            [
                campaign.id,
                campaign.name,
                campaign.state,
                f"{states[SUCCESS]}/{states.total()}",  # done: succeeded, not merely ended
                str(states[FAILED]),
                str(states[CANCELLED]),
                str(states[RUNNING]),
                f"{as_utc(campaign.created_at):%Y-%m-%d %H:%M:%S}",
            ]
        )
    return f"campaigns in {mask_url(store.url)}", columns, rows


@dataclass(frozen=True, slots=True)
class UnitLine:
    """What ``orchard status ID`` shows of a unit, as a table row or as JSON."""

    unit: Unit
    result: Result | None
    note: str  # progress or error, as the table's last column says it
    epoch: dict[str, Any] | None  # a running CNN fold's last epoch: done, of, val_acc
    earlier: list[EarlierAttempt]  # the attempts that did not end it


def unit_lines(store: Store, campaign_id: str) -> tuple[Campaign, list[UnitLine]]:
    campaign = store.get_campaign(campaign_id)
    results = store.results(campaign_id)
    units = store.units(campaign_id)
    running_cnn = [u.key for u in units if u.state == "RUNNING" and u.family == "cnn"]
    metrics = store.campaign_metrics(campaign_id, keys=running_cnn) if running_cnn else {}
    earlier_attempts = store.earlier_attempts(campaign_id)
    now = store.now()  # the clock the leases were written by, not this host's
    lines = []
    for unit in units:
        result = results.get(unit.key)
        earlier = earlier_attempts.get(unit.key, [])
        note = visible_controls(unit.error or "")  # recorded by any worker, any version
        epoch = None
        if unit.state == "RUNNING" and unit.family == "cnn":
            epochs = metrics.get(unit.key, {}).get("val_acc", [])
            if epochs:
                step, value = epochs[-1]
                epoch = {"done": step + 1, "of": unit.params.get("epochs"), "val_acc": value}
                note = f"epoch {step + 1}/{unit.params.get('epochs')} val_acc={value:.3f}"
        if unit.state == "RUNNING" and (late := _lease_late(unit, now)) is not None:
            # its worker renews the lease every third of it: one that stopped is gone
            # (killed, its host down), stuck, or was cut off from the database (its
            # delivery comes back once the lease ran out); the workers send it again
            note = (
                f"lease ran out {late:.0f} s ago: its worker is gone, stuck or cut off from "
                "the database; sent again within two lease periods" + (f" ({note})" if note else "")
            )
        if unit.state == "QUEUED" and unit.worker and not note:
            # handed back by a stopping worker, or sent again after its worker was lost
            epochs = store.metrics(unit.key).get("val_acc", []) if unit.family == "cnn" else []
            done = f" after epoch {epochs[-1][0] + 1}" if epochs else ""
            note = f"queued again{done}: was on {visible_controls(unit.worker)}"
        if result and (source := result.extra.get("reused_from")):
            # copied by --reuse: the worker and seconds are the source unit's
            note = f"reused from {source}"
        elif earlier and not note:
            note = _earlier_note(earlier[-1], len(earlier))
        lines.append(UnitLine(unit, result, note, epoch, earlier))
    return campaign, lines


#: How each state a unit was in when its next attempt took over ends that attempt.
_ENDED_BY = {
    "RUNNING": "its lease ran out",
    "LOST": "its process died (killed, out of memory)",
    "QUEUED": "sent again (its worker lost, or stopping)",
    "FAILED": "failed, then resumed",
    "CANCELLED": "cancelled, then resumed",
}


def _earlier_note(attempt: EarlierAttempt, count: int) -> str:
    """``after an earlier run on gpu-7413@vm: sent again (its worker lost, ...)``. Runs,
    not attempts: a run handed back by a stopping worker is not counted in `tries`."""
    how = _ENDED_BY.get(attempt.state, attempt.state)
    if attempt.state in ("FAILED", "CANCELLED") and attempt.error:
        how += f": {visible_controls(attempt.error)}"
    where = f" on {visible_controls(attempt.worker)}" if attempt.worker else ""
    if count == 1:
        return f"after an earlier run{where}: {how}"
    return f"after {count} earlier runs, the last{where}: {how}"


#: Seconds past a running unit's lease before `orchard status` calls its worker gone
#: (a renewal in flight as the store is read).
LEASE_SLACK = 5.0


def _lease_late(unit: Unit, now: datetime) -> float | None:
    """Seconds since a running unit's lease ran out, beyond :data:`LEASE_SLACK`; None
    while its worker keeps renewing it."""
    expires = as_utc(unit.lease_expires_at)
    if expires is None:
        return None
    late = (now - expires).total_seconds()
    return late if late > LEASE_SLACK else None


def unit_rows(store: Store, campaign_id: str) -> Rows:
    return rows_of(*unit_lines(store, campaign_id))


def rows_of(campaign: Campaign, lines: list[UnitLine]) -> Rows:
    """The table of :func:`unit_lines`' campaign and units, titled with its state."""
    columns = ("unit", "state", "tries", "worker", "seconds", "val acc", "progress / error")
    rows = [
        [
            line.unit.key.removeprefix(campaign.id + "/"),
            line.unit.state,
            str(line.unit.attempts),
            # a worker started by `celery worker -n` (not `orchard worker`, which checks
            # the name) may hold ESC sequences that would act on the terminal
            visible_controls(line.unit.worker or ""),
            f"{line.result.fit_seconds:.1f}" if line.result else "",
            f"{line.result.val_acc:.3f}" if line.result and line.result.val_acc is not None else "",
            line.note,
        ]
        for line in lines
    ]
    return f"{campaign.id}: {campaign.state}", columns, rows


def campaign_json(campaign: Campaign, states: dict[str, int]) -> dict[str, Any]:
    from shared.plan import UNIT_STATES

    return {
        "id": campaign.id,
        "name": campaign.name,
        "state": campaign.state,
        "source": campaign.source,
        "created_at": _iso(campaign.created_at),
        "finished_at": _iso(campaign.finished_at),
        # every state, 0 too: `.units.FAILED` is a number for a script, never absent
        "units": {
            "total": sum(states.values()),
            **{state: states.get(state, 0) for state in UNIT_STATES},
        },
    }


def unit_json(line: UnitLine) -> dict[str, Any]:
    unit, result = line.unit, line.result
    return {
        "key": unit.key,
        "family": unit.family,
        "stage": unit.stage,
        "fold": unit.fold,
        "queue": unit.queue,
        "state": unit.state,
        "attempts": unit.attempts,
        "worker": unit.worker,
        "task_id": unit.task_id,  # Celery's, as Flower and the workers' logs show it
        "started_at": _iso(unit.started_at),
        "finished_at": _iso(unit.finished_at),
        # a running unit's: its worker's last renewal, and when the lease runs out
        "heartbeat_at": _iso(unit.heartbeat_at),
        "lease_expires_at": _iso(unit.lease_expires_at),
        "params": unit.params,
        "train_acc": result.train_acc if result else None,
        "val_acc": result.val_acc if result else None,
        "test_acc": result.test_acc if result else None,
        "fit_seconds": result.fit_seconds if result else None,
        "reused_from": result.extra.get("reused_from") if result else None,
        # what its numbers depend on besides the seed: its libraries' threads
        "threads": result.extra.get("threads") if result else None,
        "epoch": line.epoch,
        "error": unit.error,
        "note": line.note,
        # the attempts that did not end it, oldest first: its worker lost, handed back,
        # failed before a resume
        "earlier_attempts": [
            {
                "worker": a.worker,
                "started_at": _iso(a.started_at),
                "last_heard_at": _iso(a.last_heard_at),
                "state": a.state,
                "error": a.error,
            }
            for a in line.earlier
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC, with its zone."""
    utc = as_utc(moment)
    return None if utc is None else utc.isoformat()


def units_table(store: Store, campaign_id: str, console: Console) -> RenderableType:
    """`status ID --watch`'s table: as many units as the terminal's height holds, those
    not succeeded first (a running fold's epoch below thirty finished shards was never
    seen: rich cuts a live display at the bottom of the screen)."""
    rows = unit_rows(store, campaign_id)
    height = max(1, console.size.height - 2)  # the cursor's line, a stall warning's

    def table(limit: int) -> tuple[Table, int]:  # and its height in lines
        shown = units_renderable(console, *terminal_rows(rows, limit))
        return shown, len(console.render_lines(shown, console.options, pad=False))

    # the most rows that fit (a narrow terminal's rows wrap onto more lines), by bisection;
    # a row takes a line at least, so no more than the height is ever laid out
    low, high = 1, max(1, min(MAX_TERMINAL_UNITS, len(rows[2]), height))
    best, lines = table(high)
    if lines <= height:
        return best
    best, lines = table(low)
    if lines > height:
        # not even one row under the title and the header: a line per state, and the
        # notes of the units not succeeded (a running fold's epoch)
        return _units_summary(rows, height)
    while high - low > 1:
        middle = (low + high) // 2
        shown, lines = table(middle)
        if lines <= height:
            low, best = middle, shown
        else:
            high = middle
    return best


def _units_summary(rows: Rows, height: int) -> Text:
    """A campaign's units in ``height`` lines, for a terminal too short for their table:
    the title with the units counted per state, then the units not succeeded, with
    their notes."""

    from rich.text import Text

    title, columns, cells = rows
    counts = Counter(row[1] for row in cells)
    lines = [f"{title}: " + ", ".join(f"{n} {state}" for state, n in counts.items())]
    note = columns.index(UNIT_FOLDS) if UNIT_FOLDS in columns else None
    for row in cells:
        if row[1] != "SUCCESS":
            lines.append(f"{row[0]} {row[1]}" + (f" {row[note]}" if note and row[note] else ""))
    return Text("\n".join(lines[:height]), no_wrap=True, overflow="ellipsis")


#: The most units a terminal's table shows: rich took 12 s to lay out 25,000 rows (and
#: no one reads them there). Piped output and --json have every unit.
MAX_TERMINAL_UNITS = 200


def terminal_rows(rows: Rows, limit: int = MAX_TERMINAL_UNITS) -> Rows:
    """At most ``limit`` of a campaign's unit rows, those not succeeded first (failed,
    running, queued: what one looks for), in plan order; the title says how many are
    left out and where they all are."""
    title, columns, cells = rows
    if len(cells) <= limit:
        return rows
    # the state is the second cell
    first = [i for i, row in enumerate(cells) if row[1] != "SUCCESS"]
    first += [i for i, row in enumerate(cells) if row[1] == "SUCCESS"]
    shown = sorted(first[:limit])
    return (
        f"{title} ({limit:,} of {len(cells):,} units shown, those not "
        "succeeded first; piped or with --json, every unit)",
        columns,
        [cells[i] for i in shown],
    )
