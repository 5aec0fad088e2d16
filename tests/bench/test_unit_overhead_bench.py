"""Smoke run of bench/unit_overhead.py on a grid of a dozen points: real workers run it
to the end and every figure is there. Timings are printed, never asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, load_bench


def test_unit_overhead_bench_tiny(tmp_path: Path) -> None:
    output = tmp_path / "unit_overhead.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/unit_overhead.py",
            "--units",
            "6,12",
            "--phase-repeat",
            "5",
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "baseline" in done.stdout and "slot per unit" in done.stdout
    report = json.loads(output.read_text())
    assert [row["points"] for row in report["rows"]] == [6, 12]
    for row in report["rows"]:
        assert row["slot_ms_per_unit"] > 0 and row["body_ms_median"] > 0
        assert row["store_ms"].keys() == {
            "start_unit",
            "(body's lookups)",
            "finish_unit",
            "stage_may_open",
        }
    assert report["slot_over_body"] > 0 and report["machine"]["cpu"]


def test_per_unit_figures_from_a_hand_made_schedule() -> None:
    bench = load_bench("unit_overhead")

    def unit(key: str, worker: str, started: float, finished: float) -> dict:
        return {"key": key, "family": key.split("/")[1], "worker": worker} | {
            "started": started,
            "finished": finished,
        }

    units = [
        unit("c/preprocess/s0", "a", 0.0, 1.0),
        unit("c/svm/p0/f0", "a", 1.01, 1.02),
        unit("c/svm/p1/f0", "a", 1.03, 1.04),  # 10 ms after p0 on the same worker
        unit("c/svm/p2/f0", "b", 1.01, 1.05),
        unit("c/report", "b", 1.1, 1.5),
    ]
    row = bench.per_unit(units, [0.004, 0.005, 0.006], 2)
    assert row["points"] == 3
    assert row["slot_ms_per_unit"] == pytest.approx(1000 * 0.04 * 2 / 3)
    assert row["body_ms_median"] == pytest.approx(5.0)
    assert row["slot_over_body"] == pytest.approx(row["slot_ms_per_unit"] / 5.0)
    assert row["gap_ms_median"] == pytest.approx(10.0)


def test_a_run_that_does_not_end_done_keeps_the_workers_logs_and_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_bench("unit_overhead")
    logs = tmp_path / "grid" / "run" / "home" / "logs"

    @contextmanager
    def cluster(root: Path, broker: str) -> Iterator[SimpleNamespace]:
        logs.mkdir(parents=True)
        (logs / "bench0.log").write_text("the worker's side of it\n")
        for name in ("store.db", "store.db-wal"):
            (root / name).write_text(name)
        yield SimpleNamespace(settings=None, broker=broker)

    @contextmanager
    def workers(c: SimpleNamespace, count: int) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(logs=logs, check=lambda: None)

    failed = SimpleNamespace(key="c/svm/p0/f0", state="FAILED", error="StoreError: locked")
    status = SimpleNamespace(campaign=SimpleNamespace(state="PARTIAL"), units=[failed])
    monkeypatch.setattr(bench, "cluster", cluster)
    monkeypatch.setattr(bench, "workers", workers)
    monkeypatch.setattr(
        "scheduler.api.submit", lambda *_, **__: SimpleNamespace(id="c", wait=lambda **_: status)
    )
    with pytest.raises(SystemExit) as stopped:
        bench.run_grid(tmp_path / "grid", 1, 1, "redis", 20)
    message = str(stopped.value)
    assert "campaign c ended PARTIAL:\n  c/svm/p0/f0 FAILED: StoreError: locked" in message
    kept = Path(message.rsplit(" ", 1)[1])
    try:
        assert (kept / "logs" / "bench0.log").read_text() == "the worker's side of it\n"
        assert (kept / "store.db").read_text() == "store.db"
        assert (kept / "store.db-wal").read_text() == "store.db-wal"
    finally:
        shutil.rmtree(kept)
