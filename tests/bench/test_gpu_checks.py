"""bench/gpu_checks.py's command line (the checks themselves need CUDA; they run in
bench/device_run.sh on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_bench


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
