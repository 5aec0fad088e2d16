"""bench/gpu_checks.py's command line (the checks themselves need CUDA; they run in
bench/device_run.sh on a GPU machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _module():
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("gpu_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unknown_check_is_refused_with_the_known_names(capsys):
    with pytest.raises(SystemExit) as exited:
        _module().main(["--only", "augmentation_cpu_vs_cuda,nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown checks ['nope']" in err and "compiled_train_fold" in err


def test_without_cuda_it_says_so_and_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "checks.json"
    assert _module().main(["--only", "augmentation_cpu_vs_cuda", "--json", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not out.exists()
