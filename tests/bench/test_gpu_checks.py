"""bench/gpu_checks.py's command line (the checks themselves need CUDA; they run in
bench/device_run.sh on a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, load_bench


def _module():
    return load_bench("gpu_checks")


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


def test_the_nvjpeg_check_runs_and_can_fail_on_the_cpu(monkeypatch):
    """The nvJPEG check, its decoder on the CPU (torchvision's libjpeg): it passes, and
    fails when the decoded images come out wrong."""
    module = _module()
    result = module.nvjpeg_decode(torch.device("cpu"))
    assert result["ok"], result
    assert set(result["psnr_db"]) >= {"baseline.jpg", "rotated.jpg", "cmyk.jpg", "image.png"}
    from shared import nvjpeg

    monkeypatch.setattr(nvjpeg, "orient", lambda image, orientation: image)  # no EXIF turn
    result = module.nvjpeg_decode(torch.device("cpu"))
    assert not result["ok"] and result["psnr_db"]["rotated.jpg"]["vs_opencv_path"] < 35


def test_the_fold_norm_check_runs_tiny_on_the_cpu_and_can_fail(monkeypatch):
    """The folded BatchNorm check at a tiny size, bf16 autocast on the CPU, traced with
    aot_eager: it passes, and fails when the fold gets a sign wrong."""
    module = _module()
    tiny = {"image_size": 32, "width": 0.125, "batch": 8, "backend": "aot_eager"}
    result = module.compiled_fold_norm(torch.device("cpu"), **tiny)
    assert result["ok"], result
    assert set(result["relative_l2_to_fp32"]["folded"]) == {
        "output",
        "gradients",
        "running_estimates",
    }
    from shared import cnn

    real = cnn._batch_affine

    def flipped(bn, x):
        a, b = real(bn, x)
        return -a, b

    monkeypatch.setattr(cnn, "_batch_affine", flipped)
    # traced by dynamo alone this time: the sign shows in the output, no backward needed
    result = module.compiled_fold_norm(torch.device("cpu"), **{**tiny, "backend": "eager"})
    assert not result["ok"] and result["relative_l2_to_fp32"]["folded"]["output"] > 0.5


def test_the_cnn_memory_check_runs_small_on_the_cpu_within_its_band():
    """The CNN memory check on the CPU, in a fresh process whose large arrays come and
    go as mappings of their own (as tests/workers/test_memory_estimate.py measures),
    after a smaller run has loaded what the libraries keep: the fold's measured peak
    is within the band of ``shared.memory.cnn_device_bytes``'s CPU estimate."""
    code = (
        "import json, torch\n"
        "from tests.conftest import load_bench\n"
        "torch.set_num_threads(1)\n"
        "check = load_bench('gpu_checks').cnn_memory_estimate\n"
        "cpu = torch.device('cpu')\n"
        "check(cpu, splits=(16, 8, 8), image_size=32, width=0.25, batch_size=8)\n"
        "small = dict(splits=(128, 32, 32), image_size=64, width=0.25, batch_size=128)\n"
        "print(json.dumps(check(cpu, **small)))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and 0.8 <= result["ratio"] <= 1.25, result
    assert result["estimate_gb"] > 0.1 and result["first_epoch_gb"] > 0, result
