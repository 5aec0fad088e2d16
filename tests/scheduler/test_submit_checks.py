"""What `orchard submit` checks before anything is recorded: a grid the dataset is too
small for, a dataset root that is not there, a campaign with no model to train."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from scheduler.api import _Submitting, _synthetic_dataset_guard
from shared.manifest import synthetic_root
from shared.plan import MERGE, TRAIN, UnitPlan, data_problems
from shared.spec import Campaign as CampaignSpec
from shared.spec import parse_campaign
from tests.scheduler.test_bad_input_cli import assert_one_line_error, orchard

SYNTHETIC = (
    'name = "c"\nfolds = 2\n[dataset]\nkind = "synthetic"\ntrain_per_class = 4\n'
    "test_per_class = 1\nwidth = 64\nheight = 48\n[preprocessing]\nsize = 32\n"
)


def assert_nothing_written(home: Path) -> None:
    assert not (home / "orchard.db").exists()
    assert not (home / "artifacts" / "campaigns").exists()
    assert_no_dataset_left(home)


def assert_no_dataset_left(home: Path) -> None:
    """Not even the synthetic dataset the failed submit generated (its lock file stays)."""
    assert list((home / "artifacts" / "datasets").glob("synthetic-*")) == []


def test_a_grid_the_dataset_is_too_small_for_is_refused_at_submit(tmp_path: Path) -> None:
    """12 labelled images in 2 folds leave 6 to train each fold's PCA on."""
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC + '[svm]\nvariant = "resize8"\nn_components = [4, 8, 20]\n')
    home = tmp_path / "home"
    done = orchard("submit", str(campaign), home=home)
    line = assert_one_line_error(
        done,
        str(campaign),
        "[svm] n_components = 8 exceeds what 6 training images of fold 0 allow (at most 6)",
        "(and 1 more)",  # 20 as well; 4 fits
    )
    assert line.count("n_components") == 1
    assert_nothing_written(home)


def test_a_missing_dataset_root_names_the_campaign_file_and_the_field(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    missing = tmp_path / "no-such-data"
    campaign.write_text(f'name = "c"\n[dataset]\nkind = "aicup"\nroot = "{missing}"\n')
    home = tmp_path / "home"
    done = orchard("submit", str(campaign), home=home)
    assert_one_line_error(done, f"{campaign}: {missing}: not a directory ([dataset] root)")
    assert_nothing_written(home)


@pytest.mark.parametrize("families", ["", "[rf]\nenabled = false\n"])
def test_a_campaign_with_no_model_family_is_refused(tmp_path: Path, families: str) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC + families)
    home = tmp_path / "home"
    done = orchard("submit", str(campaign), home=home)
    assert_one_line_error(
        done, f"{campaign}: no model family to train: add a [cnn], [svm] or [rf] section"
    )
    assert_nothing_written(home)


def test_a_dataset_generated_for_a_campaign_the_store_refuses_is_removed(
    tmp_path: Path,
) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC + "[rf]\nn_estimators = 5\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / "orchard.db").write_text("not a database\n")  # refused once the data is read
    done = orchard("submit", str(campaign), home=home)
    db = home / "orchard.db"
    assert_one_line_error(done, f"database sqlite:///{db}: {db} is not a SQLite database")
    assert list((home / "artifacts" / "campaigns").glob("*")) == []
    assert_no_dataset_left(home)


def test_a_failed_submit_keeps_a_dataset_generated_before(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC + "[rf]\nn_estimators = 5\n")
    home = tmp_path / "home"
    assert orchard("submit", str(campaign), home=home).returncode == 0
    [dataset] = (home / "artifacts" / "datasets").glob("synthetic-*")
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    campaign.write_text(SYNTHETIC)  # the same dataset, no model family: refused
    done = orchard("submit", str(campaign), home=home)
    assert_one_line_error(done, f"{campaign}: no model family to train")
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == files


def _synthetic(seed: int = 0) -> CampaignSpec:
    return parse_campaign(
        {"name": "c", "dataset": {"kind": "synthetic", "seed": seed}}, source="c.toml"
    )


def test_a_concurrent_submit_of_the_same_synthetic_dataset_waits_for_the_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first submit generated the dataset and then fails: the second, which would
    have reused it, waits, and finds it gone rather than losing it under its campaign."""
    campaign, artifacts = _synthetic(), tmp_path / "artifacts"
    root = synthetic_root(campaign.dataset, artifacts)
    entered = threading.Event()
    seen: list[bool] = []

    def second_submit() -> None:
        with _synthetic_dataset_guard(campaign, artifacts, _Submitting()):
            seen.append(root.exists())
            entered.set()

    second = threading.Thread(target=second_submit)
    err = ""
    with pytest.raises(RuntimeError), _synthetic_dataset_guard(campaign, artifacts, _Submitting()):
        root.mkdir(parents=True)  # the first submit generated it
        second.start()
        # until the second says it waits (however long a loaded machine takes it to come)
        deadline = time.monotonic() + 30
        while "waiting for" not in err and time.monotonic() < deadline:
            time.sleep(0.02)
            err += capsys.readouterr().err
        assert not entered.is_set()  # held off while the first submit is undecided
        raise RuntimeError("the store refused the first campaign")
    second.join(30)
    assert seen == [False]  # it generates the dataset again for its own campaign
    assert not root.exists()
    assert err + capsys.readouterr().err == (
        f"orchard: waiting for {root}: another submit is generating it or recording a "
        "campaign on it\n"
    )


def test_submits_of_different_synthetic_datasets_do_not_wait_for_each_other(
    tmp_path: Path,
) -> None:
    artifacts = tmp_path / "artifacts"
    entered = threading.Event()

    def other_submit() -> None:
        with _synthetic_dataset_guard(_synthetic(seed=1), artifacts, _Submitting()):
            entered.set()

    with _synthetic_dataset_guard(_synthetic(seed=0), artifacts, _Submitting()):
        other = threading.Thread(target=other_submit)
        other.start()
        assert entered.wait(30)
    other.join(30)


def test_without_a_lock_a_failed_submit_keeps_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without locks: another submit may be using the dataset, so it stays."""

    def no_locks(*_args: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    campaign, artifacts = _synthetic(), tmp_path / "artifacts"
    root = synthetic_root(campaign.dataset, artifacts)
    with pytest.raises(RuntimeError), _synthetic_dataset_guard(campaign, artifacts, _Submitting()):
        root.mkdir(parents=True)
        raise RuntimeError("the store refused the campaign")
    assert root.exists()


def _unit(family: str, fold: int, stage: int = TRAIN, **params: object) -> UnitPlan:
    return UnitPlan(f"c/{family}/h/f{fold}", family, stage, fold, dict(params), "h")


@pytest.mark.parametrize(
    ("unit", "problem"),
    [
        (_unit("svm", 0, variant="resize8", n_components=192), None),  # 8*8*3 = 192 features
        (
            _unit("svm", 0, variant="resize8", n_components=193),
            "[svm] n_components = 193 exceeds what 480 training images of fold 0 allow "
            "(at most 192)",
        ),
        (
            _unit("svm", 1, variant="full", n_components=500),
            "[svm] n_components = 500 exceeds what 480 training images of fold 1 allow "
            "(at most 480)",
        ),
        # [svm.search] n_components: the largest one the point tries
        (
            _unit("svm", 0, variant="full", search={"folds": 5, "n_components": [9, 481, 7]}),
            "[svm] search.n_components = 481 exceeds what 480 training images of fold 0 allow "
            "(at most 480)",
        ),
        (_unit("svm", 0, variant="full", search={"folds": 5, "C": [1.0]}, n_components=9), None),
        # a forest's rows count its augmented copies: 8 x 480
        (_unit("rf", 0, variant="full", augment="rotate_flip", pca_components=3000), None),
        (
            _unit("rf_shard", 0, variant="resize8", augment="flip", pca_components=500),
            "[rf] pca_components = 500 exceeds what 960 training rows of fold 0 allow "
            "(at most 192)",
        ),
        # selected pixels are known only once selected: the rows are the bound
        (_unit("rf", 0, variant="resize8", select_scaling=1.0, pca_components=400), None),
        (_unit("rf", 0, variant="full", augment="none", pca_components=None), None),
        (_unit("rf", 0, MERGE, variant="full", pca_components=5000), None),  # its shards tell
    ],
)
def test_data_problems(unit: UnitPlan, problem: str | None) -> None:
    problems = data_problems([unit, unit], {0: 480, 1: 480}, cache_size=64)
    assert problems == ([problem] if problem else [])


def test_a_dataset_root_outside_orchard_dataset_roots_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "datasets"
    allowed.mkdir()
    outside = tmp_path / "home-of-someone"
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC.replace("[dataset]\n", f'[dataset]\nroot = "{outside}"\n'))
    home = tmp_path / "home"
    done = orchard("submit", str(campaign), home=home, ORCHARD_DATASET_ROOTS=str(allowed))
    assert_one_line_error(
        done,
        f"{campaign}: [dataset] root {outside} is outside ORCHARD_DATASET_ROOTS ({allowed}), "
        "the folders datasets may be read from",
    )
    assert not outside.exists() and not home.exists()


def test_a_search_with_more_folds_than_a_class_has_images_is_refused() -> None:
    search = _unit("svm", 0, variant="full", n_components=9, search={"folds": 5, "C": [1.0]})
    counts = {0: {"A": 40, "B": 4, "C": 40}}
    assert data_problems([search], {0: 84}, 64, counts) == [
        "[svm] search.folds = 5 exceeds the 4 training images of class 'B' in fold 0 (each "
        "search fold needs images of every class)"
    ]
    assert data_problems([search], {0: 84}, 64, {0: {"A": 40, "B": 5, "C": 40}}) == []
    plain = _unit("svm", 0, variant="full", n_components=9)
    assert data_problems([plain], {0: 84}, 64, counts) == []


def test_a_manifest_the_artifact_disk_cannot_take_is_one_line_saying_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The artifact folder's disk full as the manifest is written: the error names the
    file and why, once, and nothing is recorded or left behind."""
    import scheduler.api as api
    from shared.artifacts import atomic_write
    from shared.errors import OrchardError
    from shared.settings import Settings

    def full_disk(path: Path, _text: str):  # noqa: ANN202
        def writer(_fh):  # noqa: ANN001, ANN202
            raise OSError(errno.ENOSPC, "No space left on device")

        return atomic_write(path, writer)

    monkeypatch.setattr(api, "atomic_write_text", full_disk)
    campaign = tmp_path / "c.toml"
    campaign.write_text(SYNTHETIC + "[rf]\nn_estimators = 2\n")
    home = tmp_path / "home"
    settings = Settings(
        home=home,
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        database_url=f"sqlite:///{home / 'orchard.db'}",
        artifacts=home / "artifacts",
    )
    with pytest.raises(OrchardError) as info:
        api.submit(campaign, settings=settings)
    message = str(info.value)
    assert message.count("cannot write") == 1, message
    assert message.endswith(
        "manifest.json: No space left on device (the disk, or this user's quota, is full)"
    ), message
    assert not (home / "orchard.db").exists()
    assert list((home / "artifacts" / "campaigns").glob("*")) == []
