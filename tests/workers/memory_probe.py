"""Run one unit's task body in this process and print, as JSON, the most memory it held
beyond what the process held before it: ``python -m tests.workers.memory_probe URL TMP
CAMPAIGN UNIT MANIFEST``. ``tests/workers/test_memory_estimate.py`` runs it in a fresh
process for each unit, so that nothing an earlier test freed is reused.

The peak is the kernel's high-water mark of the process's resident memory (VmHWM), reset
just before the body runs (``/proc/self/clear_refs``; where the kernel refuses that, the
mark since the process started, which the body's arrays exceed by far)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from workers.tasks import cnn


def _memory_kib() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0])
    return values


def _warm_torch(params: dict) -> None:
    """One training step of a small network of the unit's kind on the CPU, as a worker
    has taken in its first unit: torch.optim's modules and oneDNN's caches are the
    libraries' own memory, not the unit's."""
    torch = cnn.torch_module()
    from shared.cnn import build_model, make_optimizer

    model = build_model(params, 3)
    optimizer = make_optimizer(model, params, torch.device("cpu"))
    size = params["image_size"]
    loss = model(torch.rand(4, 3, size, size)).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.eval()(torch.rand(4, 3, size, size))


def main(url: str, tmp: str, campaign_id: str, unit_key: str, manifest_file: str) -> None:
    from db.store import Store
    from shared.manifest import Manifest
    from tests.workers.conftest import local_settings
    from workers.tasks import rf, svm
    from workers.tasks.base import UnitContext

    store = Store(url)
    settings = local_settings(Path(tmp), url)
    manifest = Manifest.from_json(Path(manifest_file).read_text(), manifest_file)
    (unit,) = [u for u in store.units(campaign_id) if u.key == unit_key]
    ctx = UnitContext(store.get_campaign(campaign_id), unit, store, settings, _manifest=manifest)
    body = {
        "svm": svm.fit_svm,
        "rf": rf.fit_rf,
        "rf_shard": rf.fit_rf_shard,
        "cnn": cnn.train_cnn_fold,
    }[unit.family]
    # what a worker has loaded by its second unit is not this unit's
    import cv2  # noqa: F401 - a CNN fold resizing its images to image_size
    import scipy.linalg  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import sklearn.svm  # noqa: F401

    if unit.family == "cnn":
        _warm_torch(dict(unit.params))
    with contextlib.suppress(OSError):  # the mark since the process started, then
        Path("/proc/self/clear_refs").write_text("5")
    before = _memory_kib()["VmRSS"]
    body.run.__wrapped__(ctx)
    print(json.dumps({"peak": (_memory_kib()["VmHWM"] - before) * 1024}))


if __name__ == "__main__":
    main(*sys.argv[1:])
