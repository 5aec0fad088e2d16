"""``[[report.published]]``: figures published elsewhere (the study's tables), each
matched to the one sweep point it names, and one line for each way an entry is wrong."""

from __future__ import annotations

import tomllib

import pytest

from shared.spec import (
    CAMPAIGN_FORMAT,
    CampaignError,
    Published,
    campaign_format,
    formats_alike,
    params_hash,
    parse_campaign,
    published_figures,
)

BASE = """\
name = "t"
validation = "dev"

[dataset]
kind = "synthetic"
dev_per_class = 3

[svm]
variant = ["original", "polarized"]
n_components = 8
C = [1.0, 10.0]
gamma = ["scale", 1e-5]

[report]
published_in = "the study, 2.3"
"""


def _parse(text: str):
    return parse_campaign(tomllib.loads(text), source="c.toml", as_written=True)


def _point_hash(campaign, **params) -> str:
    from shared.spec import sweep_points

    (point,) = [
        p
        for p in sweep_points(campaign.svm)
        if all(p[name] == value for name, value in params.items())
    ]
    return params_hash({"family": "svm", **point})


def test_each_figure_is_keyed_by_the_point_it_names_as_the_plan_keys_its_units() -> None:
    campaign = _parse(
        BASE
        + "published = [\n"
        # an integer C, a gamma in another spelling
        + '  { params = { variant = "polarized", C = 1, gamma = 0.00001 }, val_acc = 0.69875 },\n'
        + '  { params = { variant = "original", C = 10.0, gamma = "scale" }, train_acc = 1,'
        + " test_acc = 0.5 },\n"
        + "]\n"
    )
    figures = published_figures(campaign).points
    polar = _point_hash(campaign, variant="polarized", C=1.0, gamma=1e-5)
    original = _point_hash(campaign, variant="original", C=10.0, gamma="scale")
    assert figures == {
        "svm": {polar: {"val_acc": 0.69875}, original: {"train_acc": 1.0, "test_acc": 0.5}}
    }
    assert campaign.report.published_in == "the study, 2.3"


def test_without_published_figures_the_stored_campaign_and_its_digest_are_as_before() -> None:
    campaign = _parse(BASE.replace('published_in = "the study, 2.3"\n', ""))
    report = campaign.model_dump(mode="json")["report"]
    assert "published" not in report and "published_in" not in report
    assert published_figures(campaign) == ({}, {})


def test_a_stored_campaign_reads_its_figures_back() -> None:
    campaign = _parse(
        BASE + '[[report.published]]\nparams = { variant = "original", C = 1, gamma = "scale" }\n'
        "val_acc = 0.6825\n"
    )
    stored = parse_campaign(campaign.model_dump(mode="json"), source="the stored campaign")
    assert stored.digest() == campaign.digest()
    assert published_figures(stored) == published_figures(campaign)


def test_the_only_point_needs_no_params_and_the_only_family_no_name() -> None:
    text = BASE.replace('["original", "polarized"]', '"original"').replace("[1.0, 10.0]", "1.0")
    text = text.replace('["scale", 1e-5]', '"scale"')
    campaign = _parse(text + "[[report.published]]\noob_score = 0.5\nval_acc = 0.25\n")
    ((family, by_point),) = published_figures(campaign).points.items()
    assert family == "svm" and list(by_point.values()) == [{"val_acc": 0.25, "oob_score": 0.5}]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            '{ params = { variant = "polarized", gamma = "scale" }, val_acc = 0.5 }',
            'c.toml: [report] published[0] params: 2 [svm] points have variant = "polarized", '
            'gamma = "scale": name C too',
        ),
        (
            '{ params = { variant = "polarized", C = 2, gamma = "scale" }, val_acc = 0.5 }',
            'c.toml: [report] published[0] params: no [svm] point has variant = "polarized", '
            'C = 2, gamma = "scale"',
        ),
        (
            '{ params = { C = "x" }, val_acc = 0.5 }',
            "c.toml: [report] published[0] params.C: Input should be a valid number (got 'x')",
        ),
        (
            "{ params = { Cc = 1 }, val_acc = 0.5 }",
            "c.toml: [report] published[0] params.Cc: [svm] has no such parameter "
            "(did you mean C?)",
        ),
        (
            "{ params = { folds = 1 }, val_acc = 0.5 }",
            "c.toml: [report] published[0] params.folds: [svm] has no such parameter",
        ),
        (
            '{ params = { variant = "original", C = 1, gamma = "scale" }, val_acc = 68.25 }',
            "c.toml: [report] published[0].val_acc: 68.25 is not a fraction from 0 to 1 "
            "(write 68.25 % as 0.6825) (got 68.25)",
        ),
        (
            '{ params = { variant = "original", C = 1, gamma = "scale" } }',
            "c.toml: [report] published[0]: give at least one figure: train_acc, val_acc, "
            "test_acc, oob_score",
        ),
        (
            '{ family = "cnn", val_acc = 0.5 }',
            "c.toml: [report] published[0] family: the campaign runs no [cnn] section",
        ),
        (
            '{ params = { variant = "original", C = 1, gamma = "scale" }, valid_acc = 0.5 }',
            "c.toml: [report] published[0].valid_acc: unknown key",
        ),
    ],
)
def test_a_wrong_entry_is_one_line_naming_it(entry: str, expected: str) -> None:
    with pytest.raises(CampaignError) as info:
        _parse(BASE + f"published = [{entry}]\n")
    assert str(info.value) == expected


def test_two_figures_of_one_kind_for_one_point_are_refused() -> None:
    with pytest.raises(CampaignError) as info:
        _parse(
            BASE + "published = [\n"
            '  { params = { variant = "original", C = 1, gamma = 1e-5 }, val_acc = 0.5 },\n'
            '  { params = { variant = "original", C = 1.0, gamma = 0.00001 }, val_acc = 0.6 },\n'
            "]\n"
        )
    assert str(info.value) == (
        "c.toml: [report] published[1]: gives val_acc for the point of published[0] again"
    )


def test_a_campaign_of_several_families_needs_the_entry_s_family() -> None:
    text = BASE + "published = [{ val_acc = 0.5 }]\n" + "\n[rf]\nn_estimators = 10\n"
    with pytest.raises(CampaignError) as info:
        _parse(text)
    assert str(info.value) == "c.toml: [report] published[0]: give its family, one of svm, rf"
    fixed = _parse(text.replace("{ val_acc = 0.5 }", '{ family = "rf", val_acc = 0.5 }'))
    assert list(published_figures(fixed).points) == ["rf"]


def test_a_searched_parameter_does_not_name_a_point() -> None:
    text = BASE.replace("C = [1.0, 10.0]\n", "").replace('gamma = ["scale", 1e-5]\n', "")
    text = text.replace("[report]", "[svm.search]\nC = [1.0, 10.0]\n\n[report]")
    with pytest.raises(CampaignError) as info:
        _parse(text + 'published = [{ params = { variant = "original", C = 1 }, val_acc = 0.5 }]\n')
    assert str(info.value) == (
        "c.toml: [report] published[0] params.C: [svm.search] chooses it in each point; name "
        "the point by the parameters the section sweeps"
    )


def test_a_campaign_quoting_figures_is_of_format_2_and_one_without_of_format_1() -> None:
    """An orchard of format 1 would refuse the [report] fields it does not know when it
    builds the report: such a campaign waits for an updated worker. One without them
    stays of format 1, which such a worker runs as before."""
    plain = _parse(BASE.replace('published_in = "the study, 2.3"\n', ""))
    assert campaign_format(plain) == 1
    assert campaign_format(_parse(BASE)) == 2 == CAMPAIGN_FORMAT
    # the report's fields change no unit: the finished units of either are twins
    assert formats_alike(1) == formats_alike(2) == {1, 2}
    assert formats_alike(3) == {3}


FOLDS = """\
name = "t"
folds = 5

[dataset]
kind = "synthetic"

[cnn]
epochs = 1
norm_order = ["bn_act", "act_bn"]

[svm]
n_components = 8
folds = 1

[blend]
method = "both"
families = ["cnn"]

[report]
"""


def test_a_blend_s_figures_are_its_row_s_not_a_point_s() -> None:
    """The study's 1.4: one model's figures, and its five folds' vote on the test set."""
    campaign = _parse(
        FOLDS + "published = [\n"
        '  { family = "cnn", blend = "vote", test_acc = 0.800625 },\n'
        '  { family = "cnn", blend = "mean", val_acc = 0.81, test_acc = 0.8 },\n'
        '  { family = "cnn", params = { norm_order = "act_bn" }, test_acc = 0.796875 },\n'
        "]\n"
    )
    published = published_figures(campaign)
    assert isinstance(published, Published)
    assert published.blends == {
        ("cnn", "vote"): {"test_acc": 0.800625},
        ("cnn", "mean"): {"val_acc": 0.81, "test_acc": 0.8},
    }
    assert [list(f.values()) for f in published.points["cnn"].values()] == [[0.796875]]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            '{ family = "cnn", blend = "vote", params = { norm_order = "act_bn" }, '
            "test_acc = 0.5 }",
            "published[0] params: a blend is of the family's best point's folds: name no point",
        ),
        (
            '{ family = "cnn", blend = "vote", train_acc = 0.5 }',
            "published[0] train_acc: a blend's row has test_acc and val_acc only",
        ),
        (
            '{ family = "svm", blend = "vote", test_acc = 0.5 }',
            "published[0] blend: [svm] folds = 1: its best point is one model, nothing is "
            "blended; quote it as a point, without blend",
        ),
        (
            '{ family = "cnn", blend = "tally", test_acc = 0.5 }',
            "published[0].blend: Input should be 'vote' or 'mean' (got 'tally')",
        ),
        (
            '{ family = "cnn", blend = "vote", test_acc = 0.5 }, '
            '{ family = "cnn", blend = "vote", test_acc = 0.6 }',
            "published[1]: gives test_acc for the vote blend of published[0] again",
        ),
    ],
)
def test_a_wrong_blend_entry_is_one_line_naming_it(entry: str, expected: str) -> None:
    with pytest.raises(CampaignError) as info:
        _parse(FOLDS + f"published = [{entry}]\n")
    assert str(info.value) == f"c.toml: [report] {expected}"


def test_a_blend_the_report_does_not_make_is_refused() -> None:
    text = FOLDS.replace('method = "both"', 'method = "vote"')
    with pytest.raises(CampaignError) as info:
        _parse(text + 'published = [{ family = "cnn", blend = "mean", test_acc = 0.5 }]\n')
    assert str(info.value) == (
        'c.toml: [report] published[0] blend: [blend] method = "vote" makes no mean of the folds'
    )
