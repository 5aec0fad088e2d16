"""What every benchmark writes next to its figures (not a benchmark itself).

Standard library only: bench/train_throughput.py imports it on bare GPU images that
have torch but neither Celery, SQLAlchemy nor pydantic.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The first GPU ``nvidia-smi`` lists (not torch: importing it costs seconds)."""
    if not (smi := shutil.which("nvidia-smi")):
        return None
    query = [smi, "--query-gpu=name", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, check=False)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, GPU, Python and the load; ``extra`` adds a benchmark's own fields."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "free_cores": len(os.sched_getaffinity(0)),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": now(),
        "load_average": os.getloadavg(),  # 1, 5, 15 min: others sharing the cores skew timings
        **extra,
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (paths and other objects as strings), folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_results(name: str, payload: dict[str, Any]) -> Path:
    return write_json(RESULTS / f"{name}.json", payload)
