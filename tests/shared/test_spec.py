"""Campaign files: TOML -> frozen pydantic models, one-line CampaignError per mistake."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from shared.spec import (
    MAX_FOLDS,
    MAX_SEED,
    Campaign,
    CampaignError,
    CnnParams,
    load_campaign,
    params_hash,
    parse_campaign,
    restore_omitted,
    sweep_points,
)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "campaigns" / "quick.toml"

BASE = """\
name = "t"
folds = 5

[dataset]
kind = "synthetic"
train_per_class = 4

[cnn]
folds = 5
epochs = 2

[svm]
variant = "polar192"
n_components = [20, 50]
C = [1.0, 10.0]

[rf]
n_estimators = 10
"""


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = _write(tmp_path, text)
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    return path, str(info.value)


def _assert_edit_refused(tmp_path, old, new, expected):
    """BASE with ``old`` replaced by ``new`` stops with ``expected`` after its path."""
    assert old in BASE
    path, message = _error(tmp_path, BASE.replace(old, new, 1))
    assert message == f"{path}: {expected}"


def _assert_one_line(path: Path, message: str, *fragments: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- the example file


def test_quick_campaign_loads_with_expected_sweeps():
    campaign = load_campaign(QUICK)
    assert campaign.name == "quick"
    assert campaign.folds == 5
    families = dict(campaign.families())
    assert list(families) == ["cnn", "svm", "rf"]
    assert len(sweep_points(families["cnn"])) == 1
    assert len(sweep_points(families["svm"])) == 4
    assert len(sweep_points(families["rf"])) == 2
    assert families["cnn"].folds == 5
    assert families["svm"].folds == 1


def test_quick_campaign_cnn_point_has_file_values_and_defaults():
    raw = tomllib.loads(QUICK.read_text(encoding="utf-8"))["cnn"]
    (point,) = sweep_points(load_campaign(QUICK).cnn)
    for key, value in raw.items():
        if key != "folds":
            assert point[key] == value, key
    if "momentum" not in raw:
        assert point["momentum"] == CnnParams.model_fields["momentum"].default


def test_sweep_is_cartesian_product_in_file_value_order(tmp_path):
    text = BASE.replace("n_components = [20, 50]", "n_components = [50, 20, 30]")
    campaign = load_campaign(_write(tmp_path, text))
    points = [(p["n_components"], p["C"]) for p in sweep_points(campaign.svm)]
    assert points == [(50, 1.0), (50, 10.0), (20, 1.0), (20, 10.0), (30, 1.0), (30, 10.0)]


def test_scalars_become_a_single_point(tmp_path):
    campaign = load_campaign(_write(tmp_path, BASE))
    (point,) = sweep_points(campaign.rf)
    assert point["n_estimators"] == 10
    assert campaign.rf.n_estimators == (10,)


def test_standardize_at_its_default_leaves_the_points_as_they_were(tmp_path):
    # a parameter added after campaigns were stored: at its default it is not in the
    # point, so the point's hash (and what a twin campaign reuses) does not change
    before = {"variant": "polar192", "n_components": 20, "whiten": False, "C": 1.0}
    (plain, *_) = sweep_points(load_campaign(_write(tmp_path, BASE)).svm)
    assert "standardize" not in plain
    assert params_hash({"family": "svm", **plain}) == params_hash(
        {"family": "svm", **before, "gamma": "scale"}
    )
    swept = BASE.replace("C = [1.0, 10.0]", "C = [1.0, 10.0]\nstandardize = [false, true]")
    points = sweep_points(load_campaign(_write(tmp_path, swept)).svm)
    assert [p.get("standardize") for p in points] == [None, None, True, True] * 2
    # the report puts it back where some points of the sweep have it
    assert list(restore_omitted("svm", points[0], {"standardize"})) == [
        "variant",
        "n_components",
        "whiten",
        "standardize",
        "C",
        "gamma",
    ]
    assert restore_omitted("svm", points[0], {"standardize"})["standardize"] is False
    assert restore_omitted("svm", points[0], set()) == points[0]
    assert restore_omitted("report", {}, {"standardize"}) == {}


def test_cnn_input_at_its_default_leaves_the_runs_as_they_were(tmp_path):
    (plain,) = sweep_points(load_campaign(_write(tmp_path, BASE)).cnn)
    assert "input" not in plain  # the hash of every CNN run stored before it is kept
    swept = BASE.replace("epochs = 2", 'epochs = 2\ninput = ["crop", "resize"]')
    points = sweep_points(load_campaign(_write(tmp_path, swept)).cnn)
    assert points == [plain, {**plain, "input": "resize"}]
    assert restore_omitted("cnn", points[0], {"input"})["input"] == "crop"
    _, message = _error(tmp_path, BASE.replace("epochs = 2", 'epochs = 2\ninput = "squash"'))
    assert "[cnn] input: Input should be 'crop' or 'resize'" in message


def test_standardize_is_a_strict_boolean(tmp_path):
    path, message = _error(tmp_path, BASE.replace("C = [1.0, 10.0]", "C = 1.0\nstandardize = 1"))
    _assert_one_line(path, message, "[svm] standardize", "valid boolean")


def test_disabled_section_is_not_a_family(tmp_path):
    campaign = load_campaign(_write(tmp_path, BASE + "enabled = false\n"))
    assert [family for family, _ in campaign.families()] == ["cnn", "svm"]


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('name = "t"', 'name = "t"\nbogus = 1', ["bogus", "unknown key"]),
        ("epochs = 2", "epochs = 2\nbogus = 1", ["[cnn] bogus", "unknown key"]),
        ("epochs = 2", 'epochs = 2\nlr = "fast"', ["[cnn] lr", "'fast'"]),
        ("epochs = 2", "epochs = 0", ["[cnn] epochs", "greater than or equal to 1", "0"]),
        ("C = [1.0, 10.0]", "C = []", ["[svm] C: an empty list: give at least one value"]),
        ("n_components = [20, 50]", "n_components = [10, -1]", ["[svm] n_components[1]", "-1"]),
        ('variant = "polar192"', 'variant = "polar"', ["[svm] variant", "unknown variant"]),
        ('kind = "synthetic"', 'kind = "nosuch"', ["[dataset]", "kind", "nosuch"]),
        ("folds = 5\nepochs", "folds = 6\nepochs", ["[cnn] folds", "6", "folds = 5"]),
        ("epochs = 2", "epochs = 2\nimage_size = 100", ["[cnn] image_size", "multiple of 32"]),
        ('name = "t"', 'name = "../x"', ["name", "'../x'"]),
        ('name = "t"', 'name = "Has Space"', ["name", "'Has Space'"]),
        ("train_per_class = 4", "train_per_class = 0", ["[dataset] train_per_class"]),
        (
            "[cnn]",
            '[preprocessing]\ndecoder = "gpu"\n\n[cnn]',
            ["[preprocessing] decoder", "'opencv' or 'nvjpeg'", "'gpu'"],
        ),
    ],
    ids=[
        "unknown-top-level-key",
        "unknown-cnn-key",
        "wrong-type",
        "zero-count",
        "empty-sweep",
        "bad-sweep-element",
        "bad-variant",
        "unknown-dataset-kind",
        "cnn-folds-above-campaign",
        "image-size-not-multiple-of-32",
        "name-with-dots",
        "name-with-space",
        "dataset-field",
        "unknown-decoder",
    ],
)
def test_bad_field_is_one_line_naming_section_and_field(tmp_path, old, new, fragments):
    assert old in BASE
    path, message = _error(tmp_path, BASE.replace(old, new, 1))
    _assert_one_line(path, message, *fragments)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("C = [1.0, 10.0]", "C = [1.0, 1.0]", "[svm] C: duplicate value 1.0"),
        ("C = [1.0, 10.0]", "C = [1, 1.0]", "[svm] C: duplicate value 1.0"),  # the same C
        ("n_estimators = 10", "n_estimators = [10, 20, 10]",
         "[rf] n_estimators: duplicate value 10"),
        ('variant = "polar192"', 'variant = ["polar192", "polar192"]',
         "[svm] variant: duplicate value 'polar192'"),
    ],
)  # fmt: skip
def test_a_repeated_sweep_value_is_refused(tmp_path, old, new, expected):
    """Each point is one unit per fold: a repeated value would plan the same unit twice."""
    _assert_edit_refused(tmp_path, old, new, expected)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("[rf]\nn_estimators = 10\n", '[blend]\nfamilies = ["cnn", "rf"]\n',
         "[blend] families[1]: 'rf': the campaign trains no rf (no [rf] section, or "
         "enabled = false); it trains cnn, svm"),
        ("n_estimators = 10\n", 'n_estimators = 10\nenabled = false\n[blend]\nfamilies = ["rf"]\n',
         "[blend] families[0]: 'rf': the campaign trains no rf (no [rf] section, or "
         "enabled = false); it trains cnn, svm"),
        ("n_estimators = 10\n", 'n_estimators = 10\n[blend]\nfamilies = ["cnn", "svm", "cnn"]\n',
         "[blend] families[2]: 'cnn' is listed twice"),
    ],
)  # fmt: skip
def test_a_blend_of_a_family_not_trained_or_listed_twice_is_refused(tmp_path, old, new, expected):
    """Its blend would only say "n/a: Rf did not succeed", or blend a family with itself."""
    _assert_edit_refused(tmp_path, old, new, expected)


def test_the_default_blend_needs_no_cnn_and_a_stored_campaign_is_not_judged_again(tmp_path):
    campaign = load_campaign(_write(tmp_path, BASE.replace("[cnn]\nfolds = 5\nepochs = 2\n", "")))
    assert campaign.blend.families == ("cnn",)  # the default: no blend across families
    stored = campaign.model_dump(mode="json")
    stored["blend"]["families"] = ["rf", "rf"]  # written before the check
    assert parse_campaign(stored, source="the stored campaign").blend.families == ("rf", "rf")


@pytest.mark.parametrize(
    ("size", "section", "expected"),
    [
        (128, '[svm]\nvariant = "crop224"', "[svm] variant: variant 'crop224': cannot crop 224 "
         "from a 128 cache ([preprocessing] size = 128)"),
        (None, '[rf]\nvariant = "crop300"', "[rf] variant: variant 'crop300': cannot crop 300 "
         "from a 256 cache ([preprocessing] size = 256)"),
        (64, '[rf]\nvariant = ["crop64", "crop96"]', "[rf] variant[1]: variant 'crop96': "
         "cannot crop 96 from a 64 cache ([preprocessing] size = 64)"),
    ],
)  # fmt: skip
def test_a_variant_larger_than_the_cache_is_refused(tmp_path, size, section, expected):
    preprocessing = "" if size is None else f"[preprocessing]\nsize = {size}\n"
    text = f'name = "t"\n[dataset]\nkind = "synthetic"\n{preprocessing}{section}\n'
    path, message = _error(tmp_path, text)
    assert message == f"{path}: {expected}"


def test_variants_that_fit_the_cache_and_disabled_sections_are_fine(tmp_path):
    text = (
        'name = "t"\n[dataset]\nkind = "synthetic"\n[preprocessing]\nsize = 64\n'
        '[svm]\nvariant = ["crop64", "resize128", "polar192"]\n'
        '[rf]\nenabled = false\nvariant = "crop300"\n'
    )
    assert load_campaign(_write(tmp_path, text)).svm.variant == ("crop64", "resize128", "polar192")


@pytest.mark.parametrize("where", ["campaign", "dataset"])
@pytest.mark.parametrize(
    ("seed", "fragment"),
    [(-1, "greater than or equal to 0"), (MAX_SEED + 1, f"less than or equal to {MAX_SEED}")],
)
def test_seeds_are_bounded(tmp_path, where, seed, fragment):
    old = 'name = "t"' if where == "campaign" else 'kind = "synthetic"'
    path, message = _error(tmp_path, BASE.replace(old, f"{old}\nseed = {seed}", 1))
    field = "seed" if where == "campaign" else "[dataset] seed"
    assert message == f"{path}: {field}: Input should be {fragment} (got {seed})"


def test_the_largest_seed_leaves_room_for_every_fold(tmp_path):
    """Workers seed fold i with ``seed + i``; numpy and scikit-learn stop at 2**32 - 1."""
    text = BASE.replace('name = "t"', f'name = "t"\nseed = {MAX_SEED}', 1).replace(
        "folds = 5\n\n[dataset]", f"folds = {MAX_FOLDS}\n\n[dataset]", 1
    )
    campaign = load_campaign(_write(tmp_path, text))
    assert campaign.seed == MAX_SEED and campaign.folds == MAX_FOLDS
    np.random.RandomState(campaign.seed + campaign.folds - 1)  # the last fold's seed


def test_missing_dataset_section(tmp_path):
    start, end = BASE.index("[dataset]"), BASE.index("[cnn]")
    path, message = _error(tmp_path, BASE[:start] + BASE[end:])
    _assert_one_line(path, message, "[dataset]", "required but missing")


def test_several_errors_stay_on_one_line(tmp_path):
    text = BASE.replace("epochs = 2", 'epochs = [1, 0]\nlr = [0.1, "x"]')
    path, message = _error(tmp_path, text)
    _assert_one_line(path, message, "[cnn] epochs[1]", "[cnn] lr[1]")


def test_invalid_toml_syntax(tmp_path):
    path, message = _error(tmp_path, 'name = "t\n')
    _assert_one_line(path, message, "invalid TOML")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    _assert_one_line(path, str(info.value), "no such campaign file")


def test_campaign_error_is_a_value_error():
    assert issubclass(CampaignError, ValueError)


@pytest.mark.parametrize("where", ["top", "cnn"])
def test_unknown_key_with_newline_stays_one_line(tmp_path, where):
    if where == "top":
        text = BASE.replace('name = "t"', 'name = "t"\n"a\\nb" = 1')
    else:
        text = BASE.replace("epochs = 2", 'epochs = 2\n"a\\nb" = 1')
    path, message = _error(tmp_path, text)
    _assert_one_line(path, message, "unknown key")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('name = "t"', 'name = "t"\nseeds = 1', "seeds: unknown key (did you mean 'seed'?)"),
        ("epochs = 2", "epochs = 2\nepoch = 3",
         "[cnn] epoch: unknown key (did you mean 'epochs'?)"),
        ('kind = "synthetic"', 'kind = "synthetic"\ntrain_per_clas = 4',
         "[dataset] train_per_clas: unknown key (did you mean 'train_per_class'?)"),
        ("epochs = 2", "epochs = 2\nxyzzy = 3", "[cnn] xyzzy: unknown key"),  # nothing close
        # likelier than a typo: a key of another kind of [dataset], a table's name, a
        # top-level key written inside a table
        ('kind = "synthetic"', 'kind = "imagefolder"\nroot = "/x"\nseed = 1',
         "[dataset] seed: unknown key for kind 'imagefolder' (a key of kind 'synthetic'); "
         "[dataset] train_per_class: unknown key for kind 'imagefolder' (a key of kind "
         "'synthetic')"),
        ("epochs = 2", "epochs = 2\nblend = 3",
         "[cnn] blend: unknown key ([blend] is a table of its own, not a key of [cnn])"),
        ("epochs = 2", "epochs = 2\nseed = 3",
         "[cnn] seed: unknown key (seed is set at the top of the file, before any table)"),
        # deeper than the table: no kind would take it
        ('kind = "synthetic"\ntrain_per_class = 4',
         'kind = "aicup"\nroot = "/x"\n[dataset.splits.train]\ncsv = "a.csv"\n'
         'images = "a"\nseed = 3', "[dataset] splits.train.seed: unknown key"),
    ],
)  # fmt: skip
def test_an_unknown_key_suggests_the_closest_known_one(tmp_path, old, new, expected):
    _assert_edit_refused(tmp_path, old, new, expected)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('kind = "synthetic"\n', "",
         "[dataset] kind: required but missing: one of 'aicup', 'imagefolder', 'synthetic'"),
        ('kind = "synthetic"', 'kind = "bogus"',
         "[dataset] kind: unknown: one of 'aicup', 'imagefolder', 'synthetic' (got 'bogus')"),
        ('name = "t"', 'name = "Quick Run"',
         "name: only lowercase letters, digits, '_' and '-', starting with a letter or a "
         "digit, at most 48 characters (got 'Quick Run')"),
    ],
)  # fmt: skip
def test_a_missing_or_unknown_kind_and_a_bad_name_say_it_in_words(tmp_path, old, new, expected):
    """In words, not pydantic's ("Unable to extract tag using discriminator", a regex)."""
    _assert_edit_refused(tmp_path, old, new, expected)


# ---------------------------------------------------------------- paths, immutability, hashes


def test_relative_dataset_root_resolves_against_campaign_folder(tmp_path, monkeypatch):
    folder = tmp_path / "campaigns"
    folder.mkdir()
    path = _write(folder, 'name = "t"\n[dataset]\nkind = "aicup"\nroot = "../data/mango"\n')
    monkeypatch.chdir(REPO)  # somewhere else entirely
    campaign = load_campaign(path)
    assert campaign.dataset.root == (tmp_path / "data" / "mango").resolve()
    assert campaign.dataset.root.is_absolute()


def test_absolute_dataset_root_is_kept(tmp_path):
    root = tmp_path / "elsewhere"
    path = _write(tmp_path, f'name = "t"\n[dataset]\nkind = "imagefolder"\nroot = "{root}"\n')
    assert load_campaign(path).dataset.root == root


def test_synthetic_without_root_keeps_none(tmp_path):
    assert load_campaign(_write(tmp_path, BASE)).dataset.root is None


def test_models_are_frozen(tmp_path):
    campaign = load_campaign(_write(tmp_path, BASE))
    with pytest.raises(ValidationError):
        campaign.name = "other"
    with pytest.raises(ValidationError):
        campaign.dataset.seed = 3
    with pytest.raises(ValidationError):
        campaign.svm.C = (2.0,)


def test_parse_campaign_from_dict_names_the_source():
    with pytest.raises(CampaignError) as info:
        parse_campaign({"name": "t", "dataset": {"kind": "synthetic"}, "x": 1}, source="<api>")
    assert str(info.value) == "<api>: x: unknown key"


def test_params_hash_is_stable_and_order_independent():
    a = {"C": 1.5, "n_components": 200, "variant": "polar192"}
    b = {"variant": "polar192", "C": 1.5, "n_components": 200}
    canonical = json.dumps(a, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert params_hash(a) == params_hash(b) == expected
    assert params_hash({**a, "C": 1.0}) != params_hash(a)
    assert len(params_hash(a, length=20)) == 20


def test_campaign_digest_ignores_file_formatting(tmp_path):
    a = load_campaign(_write(tmp_path, BASE, "a.toml"))
    reordered = (
        "# a comment\n"
        + BASE.replace("[rf]\nn_estimators = 10\n", "")
        + ("[rf]\nn_estimators = [10]\n")
    )
    b = load_campaign(_write(tmp_path, reordered, "b.toml"))
    assert isinstance(a, Campaign)
    assert a.digest() == b.digest()
    c = load_campaign(_write(tmp_path, BASE.replace("epochs = 2", "epochs = 3"), "c.toml"))
    assert c.digest() != a.digest()


def test_dev_validation_needs_one_fold_per_model_section(tmp_path: Path) -> None:
    """validation = "dev" validates on the dev split: one fold, so a section asking for
    more is refused by name (the CNN's default is 5)."""
    text = BASE.replace("folds = 5\n\n[dataset]", 'folds = 5\nvalidation = "dev"\n\n[dataset]')
    path, message = _error(tmp_path, text)
    assert message == (
        f'{path}: [cnn] folds: validation = "dev" validates every model on the dev split, '
        "one fold: set [cnn] folds = 1 (it is 5)"
    )
    campaign = load_campaign(_write(tmp_path, text.replace("[cnn]\nfolds = 5", "[cnn]\nfolds = 1")))
    assert campaign.validation == "dev"
    assert load_campaign(_write(tmp_path, BASE)).validation == "folds"  # the default
    _, message = _error(
        tmp_path, BASE.replace("folds = 5\n\n[dataset]", 'validation = "val"\n\n[dataset]')
    )
    assert "validation: Input should be 'folds', 'dev' or 'oob' (got 'val')" in message


def test_rotating_a_half_height_variant_is_refused_at_validation(tmp_path: Path) -> None:
    """A forest's rotations stack each image with its rotated copies: that needs square
    images, so polarcrop (half as high as wide) with rotate stops here, not in every
    unit at run time."""
    text = BASE.replace(
        "n_estimators = 10", 'n_estimators = 10\nvariant = "cropped"\naugment = "rotate"'
    )
    path, message = _error(tmp_path, text)
    assert message == (
        f"{path}: [rf]: augment 'rotate' rotates the images, which needs "
        "square ones: variant 'cropped' is half as high as wide (use 'none' or 'flip')"
    )
    flipped = load_campaign(_write(tmp_path, text.replace('"rotate"', '"flip"')))
    assert flipped.rf is not None and flipped.rf.augment == ("flip",)


# ---------------------------------------------------------------- hostile values


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ('kind = "aicup"\nroot = "/tmp/\\u0000x"', "[dataset] root: "),
        ('kind = "imagefolder"\nroot = "data/\\u0000"', "[dataset] root: "),
        ('kind = "synthetic"\nroot = "/tmp/\\u0000x"', "[dataset] root: "),
        ('kind = "aicup"\nroot = "/tmp"\n[dataset.splits.train]\nimages = "tr\\u0000"\n'
         'csv = "train.csv"', "[dataset] splits.train.images: "),
        ('kind = "aicup"\nroot = "/tmp"\n[dataset.splits.train]\nimages = "train"\n'
         'csv = "\\u0000.csv"', "[dataset] splits.train.csv: "),
    ],
    ids=["aicup-root", "relative-root", "synthetic-root", "split-images", "split-csv"],
)  # fmt: skip
def test_a_nul_character_in_a_path_is_refused_at_validation(tmp_path, dataset, expected):
    path, message = _error(tmp_path, f'name = "t"\n[dataset]\n{dataset}\n')
    _assert_one_line(path, message, expected, "NUL character")


@pytest.mark.parametrize("kind", ["aicup", "imagefolder", "synthetic"])
@pytest.mark.parametrize("absolute", [False, True])
def test_a_dataset_root_that_is_a_symlink_loop_is_one_line(tmp_path, kind, absolute):
    (tmp_path / "loop").symlink_to("loop")
    root = str(tmp_path / "loop") if absolute else "loop"
    text = f'name = "t"\n[dataset]\nkind = "{kind}"\nroot = "{root}"\n'
    path, message = _error(tmp_path, text)
    assert message == (
        f"{path}: [dataset] root: cannot resolve {root!r}: too many levels of symbolic links "
        "(a symlink loop)"
    )


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('name = "t"', 'name = "t"\nseed = true', ["seed", "valid integer", "True"]),
        ("folds = 5\n\n", 'folds = "5"\n\n', ["folds", "valid integer", "'5'"]),
        ("train_per_class = 4", "train_per_class = true",
         ["[dataset] train_per_class", "valid integer"]),
        ("train_per_class = 4", "train_per_class = 4\nlabel_noise = false",
         ["[dataset] label_noise", "valid number"]),
        ("train_per_class = 4", 'train_per_class = 4\ntest_labels = "yes"',
         ["[dataset] test_labels", "valid boolean"]),
        ("n_estimators = 10", 'n_estimators = "300"', ["[rf] n_estimators", "'300'"]),
        ("n_estimators = 10", "n_estimators = [1, true]",
         ["[rf] n_estimators[1]", "valid integer"]),
        ("n_estimators = 10", "n_estimators = 10\nmax_features = true",
         ["[rf] max_features", "True"]),
        ("n_estimators = 10", "n_estimators = 10\nmax_depth = false", ["[rf] max_depth"]),
        ("epochs = 2", 'epochs = 2\naugment = "no"', ["[cnn] augment", "valid boolean", "'no'"]),
        ("epochs = 2", "epochs = 2\ncompile = 1", ["[cnn] compile", "valid boolean"]),
        ("epochs = 2", "epochs = true", ["[cnn] epochs", "valid integer"]),
        ("epochs = 2", 'epochs = 2\nlr = "0.1"', ["[cnn] lr", "valid number"]),
        ("epochs = 2", "epochs = 2\nenabled = 0", ["[cnn] enabled", "valid boolean"]),
        ("[cnn]", "[preprocessing]\nsize = true\n\n[cnn]", ["[preprocessing] size"]),
        ("[cnn]", '[report]\nlime = "false"\n\n[cnn]', ["[report] lime", "valid boolean"]),
    ],
    ids=[
        "seed-bool", "folds-string", "per-class-bool", "noise-bool", "labels-string",
        "n-estimators-string", "n-estimators-bool-in-sweep", "max-features-bool",
        "max-depth-bool", "cnn-augment-string", "compile-int", "epochs-bool", "lr-string",
        "enabled-int", "size-bool", "lime-string",
    ],
)  # fmt: skip
def test_numbers_and_booleans_are_not_coerced(tmp_path, old, new, fragments):
    """As in ``[svm]``: ``true`` is not 1 and ``"300"`` is not 300, anywhere in the file."""
    assert old in BASE
    path, message = _error(tmp_path, BASE.replace(old, new, 1))
    _assert_one_line(path, message, *fragments)


def test_an_integer_is_still_a_float_and_paths_are_strings(tmp_path):
    text = BASE.replace("epochs = 2", "epochs = 2\nlr = 1\nweight_decay = 0").replace(
        'kind = "synthetic"', 'kind = "synthetic"\nroot = "data"\nlabel_noise = 0', 1
    )
    campaign = load_campaign(_write(tmp_path, text))
    assert campaign.cnn.lr == (1.0,) and isinstance(campaign.cnn.lr[0], float)
    assert campaign.dataset.root == (tmp_path / "data").resolve()
    assert campaign.dataset.label_noise == 0.0
    # the stored form (JSON: paths as strings, tuples as lists) parses back the same
    stored = json.loads(json.dumps(campaign.model_dump(mode="json")))
    assert parse_campaign(stored, source="<stored>") == campaign


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ("train_per_class = 4", "train_per_class = 4\nwidth = 99999999999",
         ["[dataset] width", "less than or equal to 8192"]),
        ("train_per_class = 4", "train_per_class = 4\nheight = 8193",
         ["[dataset] height", "less than or equal to 8192"]),
        ("train_per_class = 4", "train_per_class = 1000001",
         ["[dataset] train_per_class", "less than or equal to 1000000"]),
        ("train_per_class = 4", "train_per_class = 4\ntest_per_class = 10000000",
         ["[dataset] test_per_class", "less than or equal to 1000000"]),
        ("train_per_class = 4", "train_per_class = 4\ndev_per_class = 10000000",
         ["[dataset] dev_per_class", "less than or equal to 1000000"]),
        ("n_estimators = 10", "n_estimators = 18446744073709551616",
         ["[rf] n_estimators", "less than or equal to 100000"]),
        ("n_estimators = 10", "n_estimators = 10\nmax_depth = 18446744073709551616",
         ["[rf] max_depth", "less than or equal to 10000"]),
        ("n_estimators = 10", "n_estimators = 10\nmin_samples_leaf = 18446744073709551616",
         ["[rf] min_samples_leaf", "less than or equal to 2147483647"]),
        ("epochs = 2", "epochs = 18446744073709551616", ["[cnn] epochs", "less than or equal"]),
        ("epochs = 2", "epochs = 2\nlr = inf", ["[cnn] lr", "finite number"]),
        ("epochs = 2", "epochs = 2\nweight_decay = inf", ["[cnn] weight_decay", "finite number"]),
        ("epochs = 2", "epochs = 2\nlr = nan", ["[cnn] lr", "finite number"]),
        ("n_estimators = 10", "n_estimators = 10\nselect_scaling = inf",
         ["[rf] select_scaling", "finite number"]),
        ("train_per_class = 4", "train_per_class = 4\nlabel_noise = nan",
         ["[dataset] label_noise", "finite number"]),
    ],
    ids=[
        "synthetic-width", "synthetic-height", "train-per-class", "test-per-class",
        "dev-per-class", "n-estimators-2-64", "max-depth-2-64", "min-samples-leaf-2-64",
        "epochs-2-64", "lr-inf", "weight-decay-inf", "lr-nan", "select-scaling-inf",
        "label-noise-nan",
    ],
)  # fmt: skip
def test_numbers_are_bounded_and_finite(tmp_path, old, new, fragments):
    assert old in BASE
    path, message = _error(tmp_path, BASE.replace(old, new, 1))
    _assert_one_line(path, message, *fragments)


def test_the_largest_bounds_are_accepted(tmp_path):
    text = BASE.replace(
        "train_per_class = 4", "train_per_class = 4\nwidth = 8192\nheight = 8192", 1
    ).replace("n_estimators = 10", "n_estimators = 100000\nmax_depth = 10000", 1)
    campaign = load_campaign(_write(tmp_path, text))
    assert (campaign.dataset.width, campaign.dataset.height) == (8192, 8192)
    assert campaign.rf.n_estimators == (100000,) and campaign.rf.max_depth == (10000,)


def test_none_in_a_max_depth_sweep_is_unlimited(tmp_path):
    """TOML has no null: "none" is sklearn's None (grown until the leaves are pure)."""
    text = BASE.replace("n_estimators = 10", 'n_estimators = 10\nmax_depth = [4, "none"]', 1)
    campaign = load_campaign(_write(tmp_path, text))
    assert [p["max_depth"] for p in sweep_points(campaign.rf)] == [4, None]
    # stored as null, and read back the same
    stored = json.loads(campaign.model_dump_json())
    assert stored["rf"]["max_depth"] == [4, None]
    assert parse_campaign(stored, source="stored") == campaign
    path, message = _error(tmp_path, BASE.replace("n_estimators = 10", 'max_depth = "full"', 1))
    _assert_one_line(path, message, "[rf] max_depth", "valid integer")


def test_a_campaign_file_with_a_utf8_bom_loads(tmp_path):
    """Editors on Windows often start a UTF-8 file with a byte order mark."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_campaign(path) == load_campaign(_write(tmp_path, BASE))


# ---------------------------------------------------------------- [svm.search]

SEARCH = BASE.replace(
    "C = [1.0, 10.0]\n",
    'standardize = true\n\n[svm.search]\nfolds = 3\nC = [1.0, 10.0]\ngamma = [1e-5, "scale"]\n',
)


def test_a_search_is_part_of_each_point_and_takes_its_parameters_out(tmp_path):
    campaign = load_campaign(_write(tmp_path, SEARCH))
    points = sweep_points(campaign.svm)
    search = {"folds": 3, "C": (1.0, 10.0), "gamma": (1e-5, "scale")}
    assert points == [
        {"variant": "polar192", "n_components": k, "whiten": False, "standardize": True,
         "search": search}
        for k in (20, 50)
    ]  # fmt: skip
    # the stored form reads back the same, and a point without a search keeps its hash
    stored = json.loads(json.dumps(campaign.model_dump(mode="json")))
    assert parse_campaign(stored, source="<stored>") == campaign
    plain = load_campaign(_write(tmp_path, BASE, "plain.toml"))
    assert "search" not in sweep_points(plain.svm)[0]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("folds = 3", "folds = 1", "[svm] search.folds: Input should be greater than or "
         "equal to 2 (got 1)"),
        ("C = [1.0, 10.0]", "C = [1.0, -1.0]", "[svm] search.C[1]: Input should be greater "
         "than 0 (got -1.0)"),
        ("C = [1.0, 10.0]", "C = [1.0, 1]", "[svm] search.C: duplicate value 1.0"),
        ("C = [1.0, 10.0]", "C = []", "[svm] search.C: give at least one value to search"),
        ('gamma = [1e-5, "scale"]', 'gamma = ["x"]', "[svm] search.gamma[0]: Input should "
         "be a valid number or 'scale' or 'auto' (got 'x')"),
        ("C = [1.0, 10.0]", "Cs = [1.0]", "[svm] search.Cs: unknown key"),
        ("standardize = true", "C = 2.0", "[svm] C: [svm.search] chooses it; give its values "
         "there only"),
        ('C = [1.0, 10.0]\ngamma = [1e-5, "scale"]', "", "[svm] search: give at least one of "
         "n_components, C, gamma as a list to search"),
        # written in the file, even at its default: which one would run?
        ("C = [1.0, 10.0]", "n_components = [4, 8]", "[svm] n_components: [svm.search] "
         "chooses it; give its values there only"),
        ("standardize = true", "C = 1.5", "[svm] C: [svm.search] chooses it; give its values "
         "there only"),
        ("folds = 3", "folds = 3\n[[svm.search.x]]", "[svm] search.x: unknown key"),
        ("folds = 3", 'folds = "3"', "[svm] search.folds: Input should be a valid integer "
         "(got '3')"),
    ],
)  # fmt: skip
def test_a_bad_search_is_one_line_naming_its_field(tmp_path, old, new, expected):
    if old == "folds = 3":
        text = SEARCH.replace("[svm.search]\nfolds = 3", "[svm.search]\n" + new, 1)
    elif old == "standardize = true":
        text = SEARCH.replace(old, new, 1)
    else:
        head, tail = SEARCH.split("[svm.search]")
        text = head + "[svm.search]" + tail.replace(old, new, 1)
    path, message = _error(tmp_path, text)
    assert message == f"{path}: {expected}"


def test_out_of_bag_validation_is_for_forests_alone_in_one_fold(tmp_path: Path) -> None:
    """validation = "oob" (the study's section 3): a CNN or an SVM has no trees that left
    an image out, and a forest validated out of bag has one fold."""
    text = BASE.replace("folds = 5\n\n[dataset]", 'validation = "oob"\n\n[dataset]')
    path, message = _error(tmp_path, text)
    assert message == (
        f'{path}: [cnn]: validation = "oob" judges forests by the trees that did not draw '
        'each image, and a CNN has none: run [cnn] in a campaign with validation = "folds" '
        'or "dev"'
    )
    forests = text.split("[cnn]")[0] + "[rf]\nn_estimators = 10\nfolds = 2\n"
    path, message = _error(tmp_path, forests)
    assert message == (
        f'{path}: [rf] folds: validation = "oob" validates every model out of bag, one '
        "fold: set [rf] folds = 1 (it is 2)"
    )
    campaign = load_campaign(_write(tmp_path, forests.replace("folds = 2\n", "")))
    assert campaign.validation == "oob" and campaign.svm is None
    # a selection forest fitted on every image's label would leak them into the OOB score
    selecting = forests.replace("folds = 2\n", "select_scaling = [1.0, 2.0]\n")
    path, message = _error(tmp_path, selecting)
    assert message.startswith(f'{path}: [rf] select_scaling: validation = "oob" judges')


def test_one_search_table_per_section(tmp_path):
    """[[svm.search]] twice would be a sweep of searches, which nothing else expects."""
    twice = SEARCH.replace("[svm.search]", "[[svm.search]]").replace(
        "\n[rf]", "\n[[svm.search]]\ngamma = [1e-3]\n\n[rf]"
    )
    path, message = _error(tmp_path, twice)
    assert message == f"{path}: [svm] search: give one table, not a list of 2"
    # one table in an array (a campaign an earlier orchard stored) is that table
    once = SEARCH.replace("[svm.search]", "[[svm.search]]")
    assert load_campaign(_write(tmp_path, once)) == load_campaign(_write(tmp_path, SEARCH, "s"))
    # a stored campaign without a search has no search key at all: its digest is unchanged
    assert "search" not in load_campaign(_write(tmp_path, BASE)).model_dump(mode="json")["svm"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('variant = "polar192"', "gamma = {a = 1}", "[svm] gamma: Input should be a valid "
         "number or 'scale' or 'auto'"),
        ("n_estimators = 10", "max_features = {x = 1}", "[rf] max_features: Input should be a "
         "valid number or 'sqrt' or 'log2'"),
        ("epochs = 2", 'dense = "512,,64"', '[cnn] dense: dense must be comma-separated '
         'positive integers such as "512,256,64" (got \'512,,64\')'),
        ("C = [1.0, 10.0]", "search = 5", "[svm] search: expected a table (got 5)"),
    ],
)  # fmt: skip
def test_union_tags_and_model_names_stay_out_of_messages(tmp_path, old, new, expected):
    """Pydantic's names for a union's members or a model are not the file's words."""
    _assert_edit_refused(tmp_path, old, new, expected)


@pytest.mark.parametrize("key", ["shard_size", "max_pixels"])
def test_preprocessing_counts_are_bounded_too(tmp_path, key):
    text = BASE + f"\n[preprocessing]\n{key} = 18446744073709551616\n"
    path, message = _error(tmp_path, text)
    _assert_one_line(path, message, f"[preprocessing] {key}", "less than or equal to 2147483647")


def test_a_dataset_root_is_made_absolute_keeping_its_symlinks_and_home(tmp_path, monkeypatch):
    """Each host follows a symlink its own way (a mount point): the root is recorded
    as the campaign names it, relative to the file, not resolved on the submitter's
    host; ``~`` is the submitter's home; '..' after a symlink goes where it leads."""
    from shared.spec import load_campaign

    (tmp_path / "mnt-a" / "mango").mkdir(parents=True)
    (tmp_path / "mnt-a" / "pears").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "mnt-a" / "mango")
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.toml"
    for written, recorded in [
        ("data", tmp_path / "data"),
        ("./sub/../data", tmp_path / "data"),
        ("~/data", tmp_path / "data"),
        (str(tmp_path / "data"), tmp_path / "data"),
        ("data/../pears", tmp_path / "mnt-a" / "pears"),
        (str(tmp_path / "data" / ".." / "pears"), tmp_path / "mnt-a" / "pears"),
    ]:
        path.write_text(f'name = "t"\n[dataset]\nkind = "imagefolder"\nroot = "{written}"\n')
        assert load_campaign(path).dataset.root == recorded, written
    path.write_text('name = "t"\n[dataset]\nkind = "imagefolder"\nroot = "~nosuchuser/x"\n')
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    assert str(info.value) == f"{path}: [dataset] root: ~nosuchuser: no such user"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[svn]\nC = 1.0\n', "[svn]: unknown table (did you mean [svm]?)"),
        ('[dataset]\nkind = "aicup"\nroot = "."\nclasses = []\n',
         "[dataset] classes: an empty list: give the labels, in their index order"),
        ('[dataset]\nkind = "aicup"\nroot = "."\nclasses = ["A", "B", "A"]\n',
         "[dataset] classes: 'A' is listed twice"),
        ('[dataset]\nkind = "aicup"\nroot = "."\n[dataset.splits.tran]\ncsv = "a.csv"\n'
         'images = "a"\n',
         "[dataset] splits.tran: Input should be 'train', 'dev' or 'test' (got 'tran')"),
    ],
    ids=["misspelt-table", "no-classes", "a-class-twice", "misspelt-split"],
)  # fmt: skip
def test_a_misspelt_table_or_a_bad_dataset_field_names_it(tmp_path, text, expected):
    """They named the key as a key ("svn: unknown key"), or the dataset's folder instead
    of the field ("…/mango: classes must be non-empty and unique: ()")."""
    extra = "" if text.startswith("[dataset]") else '[dataset]\nkind = "synthetic"\n'
    path, message = _error(tmp_path, f'name = "t"\n{extra}{text}[cnn]\n')
    assert message == f"{path}: {expected}"


def test_a_value_of_either_kind_gets_one_sentence(tmp_path):
    """A field that takes a number or a name said each kind's message in full, each
    with its own "(got ...)"."""
    text = BASE.replace("C = [1.0, 10.0]", 'C = [1.0, 10.0]\ngamma = "Scale"')
    path, message = _error(tmp_path, text)
    assert message == (
        f"{path}: [svm] gamma: Input should be a valid number or 'scale' or 'auto' (got 'Scale')"
    )
    text = BASE.replace("n_estimators = 10", "n_estimators = 10\nmax_features = 1.5")
    path, message = _error(tmp_path, text)
    assert message == (
        f"{path}: [rf] max_features: Input should be less than or equal to 1 or 'sqrt' or "
        "'log2' (got 1.5)"
    )


# ---------------------------------------------------------------- campaign format

#: The campaign file's fields, bounds and choices (not their defaults or descriptions),
#: and the manifest's fields, as each campaign format has them: a fingerprint of the
#: Campaign model's JSON schema and of the manifest's dataclasses.
FIELDS_OF_FORMAT = {1: "96bd6a50dd532529", 2: "ca1475198481a788"}


def _fields_fingerprint() -> str:
    from dataclasses import fields

    from shared.datasets import Skipped
    from shared.manifest import Entry, Manifest

    def bare(node: object, names: bool = False) -> object:
        """A schema node without its words and defaults; ``names``: a map of field or
        model names (``properties``, ``$defs``), whose keys all stay."""
        if isinstance(node, dict):
            dropped = () if names else ("description", "title", "default", "examples")
            return {
                k: bare(v, names=not names and k in ("properties", "$defs"))
                for k, v in node.items()
                if k not in dropped
            }
        if isinstance(node, list):
            return [bare(v) for v in node]
        return node

    manifest = {c.__name__: sorted(f.name for f in fields(c)) for c in (Manifest, Entry, Skipped)}
    both = {"campaign": bare(Campaign.model_json_schema()), "manifest": manifest}
    return hashlib.sha256(json.dumps(both, sort_keys=True).encode()).hexdigest()[:16]


def test_the_campaign_format_is_raised_with_the_campaign_files_fields() -> None:
    """A worker of an older orchard ignores a campaign field it does not know, and
    records its units as any others: every change to the fields (or the manifest's) must
    raise CAMPAIGN_FORMAT, which keeps such workers off the campaigns that use it."""
    from shared.spec import CAMPAIGN_FORMAT

    found = _fields_fingerprint()
    assert found == FIELDS_OF_FORMAT.get(CAMPAIGN_FORMAT), (
        f"the campaign file's or the manifest's fields changed (fingerprint {found}): "
        "raise shared.spec.CAMPAIGN_FORMAT and record the fingerprint for it in "
        "FIELDS_OF_FORMAT"
    )
