"""Campaign files refused at submit rather than on a worker: numbers no run can mean
(a stride, a dense width, an image size), files that are not campaign files (a folder,
a pipe, a device, another encoding, TOML nested past the parser's recursion), and
variant names that are another variant's under a second spelling."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from shared.cnn import build_model
from shared.spec import (
    MAX_CACHE_SIZE,
    MAX_CAMPAIGN_BYTES,
    MAX_CNN_PARAMETERS,
    MAX_DENSE_LAYERS,
    MAX_DENSE_WIDTH,
    CampaignError,
    CnnParams,
    PreprocessingSpec,
    load_campaign,
)
from shared.variants import check_variant, variant_shape

BASE = """\
name = "t"
folds = 2

[dataset]
kind = "synthetic"
train_per_class = 4

[preprocessing]
size = 64

[cnn]
folds = 2
epochs = 1
width = 0.125
image_size = 32
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "c.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


def _cnn(tmp_path: Path, *lines: str, size: int = 64) -> Path:
    """BASE with ``lines`` added to its [cnn] section (each replacing its key's line)."""
    keys = {line.split("=")[0].strip() for line in lines}
    kept = [
        line
        for line in BASE.replace("size = 64", f"size = {size}").splitlines()
        if line.split("=")[0].strip() not in keys or "[" in line
    ]
    return _write(tmp_path, "\n".join([*kept, *lines]) + "\n")


def test_the_base_campaign_loads(tmp_path):
    assert load_campaign(_cnn(tmp_path)).cnn.image_size == (32,)


# ---------------------------------------------------------------- [cnn] stride


@pytest.mark.parametrize("stride", [65536, 2**31 - 1])
def test_a_stride_libtorch_crashes_on_is_refused(tmp_path, stride):
    message = _error(_cnn(tmp_path, f"stride = {stride}"))
    assert "[cnn] stride" in message and f"{MAX_CACHE_SIZE}" in message


def test_a_stride_larger_than_the_image_is_refused_naming_both(tmp_path):
    message = _error(_cnn(tmp_path, "stride = [1, 33]"))
    assert "[cnn]" in message
    assert "stride (33) must not exceed image_size (32)" in message


def test_a_stride_of_the_image_size_builds_a_network_that_runs(tmp_path):
    campaign = load_campaign(_cnn(tmp_path, "image_size = 64", "stride = 64"))
    assert campaign.cnn.stride == (64,)
    params = CnnParams(width=0.125, image_size=64, stride=64).model_dump()
    model = build_model(params, 3)
    assert model.feature_side == 1
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


# ---------------------------------------------------------------- [cnn] dense, image_size


@pytest.mark.parametrize(
    ("dense", "fragment"),
    [
        ('"99999999999999999999"', f"at most {MAX_DENSE_WIDTH}"),
        (f'"512,{MAX_DENSE_WIDTH + 1}"', f"at most {MAX_DENSE_WIDTH}"),
        ('"1' + "0" * 5000 + '"', f"at most {MAX_DENSE_WIDTH}"),  # past int()'s digit limit
        (f'"{",".join(["8"] * (MAX_DENSE_LAYERS + 1))}"', f"at most {MAX_DENSE_LAYERS} widths"),
        ('"５１２"', "comma-separated positive integers"),  # full-width digits
        ('"+512"', "comma-separated positive integers"),
        ('"5_12"', "comma-separated positive integers"),
    ],
    ids=["huge", "one-over", "5000-digits", "too-many-layers", "full-width", "plus", "underscore"],
)
def test_a_dense_head_no_run_can_mean_is_refused(tmp_path, dense, fragment):
    message = _error(_cnn(tmp_path, f"dense = {dense}"))
    assert "[cnn] dense" in message and fragment in message


def test_the_widest_dense_head_is_accepted(tmp_path):
    campaign = load_campaign(_cnn(tmp_path, f'dense = " 0064 , {MAX_DENSE_WIDTH}"'))
    assert campaign.cnn.dense == (f"64,{MAX_DENSE_WIDTH}",)


@pytest.mark.parametrize("image_size", [999999968, 2048])
def test_an_image_size_beyond_any_cache_is_refused(tmp_path, image_size):
    message = _error(_cnn(tmp_path, f"image_size = {image_size}"))
    assert "[cnn] image_size" in message and f"{MAX_CACHE_SIZE}" in message


def test_an_image_size_larger_than_the_cache_is_refused(tmp_path):
    message = _error(_cnn(tmp_path, "image_size = [32, 128]"))
    assert "[cnn] image_size[1]: 128 is larger than the cached images" in message
    assert "[preprocessing] size = 64" in message


def test_an_image_size_of_the_cache_size_is_accepted(tmp_path):
    assert load_campaign(_cnn(tmp_path, "image_size = 64")).cnn.image_size == (64,)


def test_the_image_size_bound_is_the_largest_cache():
    assert PreprocessingSpec.model_fields["size"].metadata[-1].le == MAX_CACHE_SIZE
    PreprocessingSpec(size=MAX_CACHE_SIZE)
    CnnParams(image_size=MAX_CACHE_SIZE, stride=MAX_CACHE_SIZE)


# ---------------------------------------------------------------- what is read


def test_toml_nested_too_deeply_is_one_line(tmp_path):
    path = _write(tmp_path, 'name = "x"\na = ' + "[" * 500 + "]" * 500 + "\n")
    assert "invalid TOML: arrays or inline tables nested too deeply" in _error(path)
    path = _write(tmp_path, 'name = "x"\na = ' + "{b = " * 2000 + "1" + "}" * 2000 + "\n")
    assert "nested too deeply" in _error(path)


def test_a_directory_is_not_a_campaign_file(tmp_path):
    folder = tmp_path / "x.toml"
    folder.mkdir()
    message = _error(folder)
    assert message == f"{folder}: not a regular file (a folder)"


def _load_in_thread(path: Path) -> str:
    """load_campaign's error, failing the test (not hanging it) if the call blocks."""
    result: list[str] = []

    def load() -> None:
        try:
            load_campaign(path)
        except CampaignError as exc:
            result.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), f"load_campaign({path}) blocked"
    [message] = result
    return message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "x.toml"
    os.mkfifo(fifo)
    assert _load_in_thread(fifo) == f"{fifo}: not a regular file (a named pipe (FIFO))"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_is_refused_unread():
    assert (
        _load_in_thread(Path("/dev/zero")) == "/dev/zero: not a regular file (a character device)"
    )


def test_a_symlink_to_a_campaign_file_is_read(tmp_path):
    link = tmp_path / "link.toml"
    link.symlink_to(_cnn(tmp_path))
    assert load_campaign(link).name == "t"


def test_a_file_larger_than_a_campaign_is_refused(tmp_path):
    path = _write(tmp_path, b"# " + b"x" * MAX_CAMPAIGN_BYTES + b"\n")
    assert _error(path) == f"{path}: too large for a campaign file (more than 1 MiB)"


def test_a_latin1_file_names_the_byte_line_and_column(tmp_path):
    path = _write(tmp_path, 'name = "t"\ndescription = "café"\n'.encode("latin-1"))
    message = _error(path)
    assert message == (f"{path}: not UTF-8 text (byte 0xe9 at line 2, column 19); save it as UTF-8")


def test_a_byte_order_mark_is_still_dropped(tmp_path):
    path = _write(tmp_path, b"\xef\xbb\xbf" + _cnn(tmp_path).read_bytes(), name="bom.toml")
    assert load_campaign(path).name == "t"


# ---------------------------------------------------------------- variant names


@pytest.mark.parametrize(
    "variant",
    ["resize32\n", "resize３２", "resize\u0663\u0662", "crop224 ", "full32", "resize"],
    ids=["newline", "full-width", "arabic-indic", "trailing-space", "full-with-size", "no-size"],
)
def test_a_variant_is_ascii_and_matched_whole(variant):
    with pytest.raises(ValueError, match="unknown variant"):
        check_variant(variant)


def test_a_variant_size_has_no_leading_zeros():
    with pytest.raises(ValueError, match="without leading zeros"):
        check_variant("resize032")
    with pytest.raises(ValueError, match="between 8 and 1024"):
        check_variant("resize" + "9" * 5000)  # past int()'s digit limit: still one line
    assert variant_shape("polarcrop192", 256) == (96, 192, 3)


@pytest.mark.parametrize(
    ("variants", "fragment"),
    [
        ('["resize32", "resize３２"]', "[svm] variant[1]: unknown variant"),
        ('"resize32\\n"', "[svm] variant: unknown variant 'resize32\\n'"),
        ('["resize32", "resize032"]', "[svm] variant[1]: variant 'resize032'"),
        (
            '["original", "resize192"]',
            "[svm] variant[1]: 'resize192' is the same variant as 'original' (resize192)",
        ),
    ],
    ids=["full-width", "newline", "leading-zero", "alias"],
)
def test_a_sweep_naming_one_variant_twice_is_refused(tmp_path, variants, fragment):
    text = BASE.replace("size = 64", "size = 256") + f"\n[svm]\nvariant = {variants}\n"
    message = _error(_write(tmp_path, text))
    assert fragment in message, message


# ---------------------------------------------------------------- the network's size


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        (["width = 1", 'dense = "65536,65536"'], 'dense = "65536,65536", width = 1, image_size'),
        (["width = 4", 'dense = "16384,16384"'], 'dense = "16384,16384", width = 4, image_size'),
    ],
    ids=["dense", "width"],
)
def test_a_network_too_large_for_any_worker_is_refused_naming_its_point(tmp_path, knobs, named):
    """Each knob alone is within its bound; together they make billions of parameters,
    which a worker's host would run out of memory building or training."""
    message = _error(_cnn(tmp_path, *knobs))
    assert "[cnn]" in message and named in message
    assert f"parameters, more than {MAX_CNN_PARAMETERS:,} (the study's has 17,713,382)" in message


def test_the_study_network_at_the_largest_image_is_accepted():
    study = CnnParams()
    assert study.parameter_count() == 17_713_382  # 3 classes; counted as torch does, below
    large = CnnParams(image_size=MAX_CACHE_SIZE)  # 512 x 32 x 32 features into 512
    assert study.parameter_count() < large.parameter_count() <= MAX_CNN_PARAMETERS


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"width": 0.25, "stride": 3, "dense": "100", "activation": "relu", "pool": "conv"},
        {"width": 0.5, "image_size": 96, "stride": 2, "dense": "7,9", "activation": "leakyrelu"},
        {"width": 1.5, "image_size": 32, "dense": "512", "pool": "conv"},
    ],
)
def test_the_parameter_count_is_what_torch_builds(knobs):
    params = CnnParams(**knobs)
    model = build_model(params.model_dump(), 5)
    assert params.parameter_count(5) == sum(p.numel() for p in model.parameters())
