"""Smoke run of bench/rf_shards.py at its smallest size: it runs, both paths report
accuracies, and the merged forest has every tree. Timings are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_rf_shards_bench_tiny(tmp_path: Path) -> None:
    output = tmp_path / "rf_shards.json"
    done = subprocess.run(
        [sys.executable, "bench/rf_shards.py", "--tiny", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "speed-up" in done.stdout and "baseline" in done.stdout
    report = json.loads(output.read_text())
    trees = report["args"]["trees"]
    baseline, orchard = report["baseline"], report["orchard"]
    assert baseline["trees"] == orchard["trees"] == trees
    assert sum(orchard["shard_trees"]) == trees and len(orchard["shard_trees"]) == 2
    assert orchard["shards_scored"] is True  # the merge added the shards' scores
    for path in (baseline, orchard):
        assert 0.0 <= path["test_acc"] <= 1.0 and 0.0 <= path["val_acc"] <= 1.0
        assert 0.0 <= path["oob_score"] <= 1.0
        assert path["peak_rss_mib"] > 0 and path["wall_seconds"] > 0
    assert report["speedup"] > 0 and report["speedup_with_free_cores"] > 0
    assert report["machine"]["cpu"]
