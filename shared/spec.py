"""Campaign files: TOML validated by frozen pydantic models.

A campaign names a dataset, how to preprocess it, and which model families to run.
In a model section (``[cnn]``, ``[svm]``, ``[rf]``) any parameter may be a list: each
list is a sweep dimension and the family runs the cartesian product of them, once
per cross-validation fold it asks for::

    [svm]
    n_components = [50, 100, 200]   # 3 x 2 = 6 grid points
    C = [1.0, 1.5]

Every mistake in a file becomes one :class:`CampaignError` line naming the file,
the section and the field.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import itertools
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.cnn_shape import Network
from shared.errors import OrchardError, printable
from shared.settings import expand_home
from shared.smallfiles import FileTooLargeError, NotRegularFileError, read_small_file
from shared.variants import canonical_variant, check_variant

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"

#: The most cross-validation folds a campaign may ask for.
MAX_FOLDS = 50
#: Workers seed fold i's units with ``seed + i``, and numpy / scikit-learn take seeds
#: up to 2**32 - 1: the largest seed leaves room for the last fold.
MAX_SEED = 2**32 - 1 - MAX_FOLDS
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
#: The most trees a forest may have, and its deepest tree.
MAX_ESTIMATORS = 100_000
MAX_DEPTH = 10_000
#: The largest synthetic image side, and the most synthetic images per class and split.
MAX_SYNTHETIC_SIDE = 8192
MAX_PER_CLASS = 1_000_000
#: Any other count a worker hands to numpy, scikit-learn or torch: a C int.
MAX_COUNT = 2**31 - 1
#: The largest preprocessing cache side; the CNN's input is cut from that cache, so no
#: ``image_size`` (nor a ``stride``, see :class:`CnnParams`) can usefully exceed it.
MAX_CACHE_SIZE = 1024
#: The widest hidden layer of the CNN's dense head (before ``width`` scales it), and the
#: most hidden layers: torch takes a width as a C int, but no head is meant that large.
MAX_DENSE_WIDTH = 65_536
MAX_DENSE_LAYERS = 100
#: A CNN's trainable parameters: 56x the study's 17.7 million. Past it the weights,
#: gradients and optimiser state alone take 12-16 GB (fp32; SGD with momentum, Adam),
#: and a worker's host runs out of memory rather than refusing the unit.
MAX_CNN_PARAMETERS = 1_000_000_000
#: A campaign file is a page of TOML; more is not one (and is not read into memory).
MAX_CAMPAIGN_BYTES = 1 << 20


#: What a campaign's units compute, as a number: stored with each campaign at its
#: submit, and a worker runs no unit of a campaign whose format is newer than its own
#: (an older orchard on a host not yet updated would ignore the fields it does not
#: know, or compute the units the old way, and record the results as any others).
#: Raise it with every change to the campaign file's fields, the manifest's, or what a
#: unit computes from them; ``tests/shared/test_spec.py`` holds the fields' fingerprint
#: for each format, and fails until a change to them raises it. 2: ``[report]
#: published`` and ``published_in``.
CAMPAIGN_FORMAT = 2

#: Formats whose units compute alike: each later one of a group only added fields that
#: the report reads, so the finished units of campaigns of one group are twins
#: (``submit --reuse``). A format that changes what units compute starts a group.
ALIKE_FORMATS: tuple[frozenset[int], ...] = (frozenset({1, 2}),)


def formats_alike(version: int) -> frozenset[int]:
    """The formats whose units compute as those of a campaign of format ``version``."""
    return next((group for group in ALIKE_FORMATS if version in group), frozenset({version}))


class CampaignError(OrchardError, ValueError):
    """A campaign file that cannot be run; the message is one line."""


class _Frozen(BaseModel):
    """Numbers and booleans are strict and finite everywhere: ``true`` is not 1, ``"300"``
    is not 300, ``"no"`` is not False, and ``inf`` / ``nan`` are refused (an integer is
    still a float: ``lr = 1``). Paths and lists, which TOML and the stored JSON give as
    strings and lists, are the lax :data:`FilePath` and :func:`_items`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def _no_nul(value: Any) -> Any:
    if "\x00" in str(value):
        # the operating system cannot open such a path ("embedded null byte")
        raise ValueError("a path must not contain a NUL character")
    return value


#: A path from the file: a string in TOML and in the stored campaign.
FilePath = Annotated[Path, Field(strict=False), AfterValidator(_no_nul)]


def _items(item: Any) -> Any:
    """A tuple the file gives as a list; its items stay strict."""
    return Annotated[tuple[item, ...], Field(strict=False)]


# ---------------------------------------------------------------- parameters of one unit


def _variant(value: str) -> str:
    check_variant(value)
    return value


#: A feature variant derived from the preprocessing cache (see ``shared.variants``).
Variant = Annotated[str, AfterValidator(_variant)]


_DIGITS = re.compile(r"[0-9]+")  # ASCII: int() would also take "５１２", "+512" and "5_12"


def _dense_widths(value: str) -> str:
    """``"512, 256,64"`` -> ``"512,256,64"``: hidden widths of the CNN's dense head."""
    parts = [part.strip() for part in value.split(",")]
    if not all(_DIGITS.fullmatch(part) for part in parts) or min(map(len, parts)) == 0:
        # the error formatter appends the value: "(got '512,,64')"
        raise ValueError('dense must be comma-separated positive integers such as "512,256,64"')
    if len(parts) > MAX_DENSE_LAYERS:
        raise ValueError(f"dense must have at most {MAX_DENSE_LAYERS} widths")
    # a long run of digits is no width: compare its length before int() reads it
    if any(len(part.lstrip("0")) > len(str(MAX_DENSE_WIDTH)) for part in parts):
        raise ValueError(f"dense widths must be at most {MAX_DENSE_WIDTH}")
    widths = [int(part) for part in parts]
    if min(widths) < 1:
        raise ValueError('dense must be comma-separated positive integers such as "512,256,64"')
    if max(widths) > MAX_DENSE_WIDTH:
        raise ValueError(f"dense widths must be at most {MAX_DENSE_WIDTH}")
    return ",".join(map(str, widths))


class CnnParams(_Frozen):
    """One CNN training run; the architecture is the study's table, scaled by ``width``.

    The variants the study compared (section 1.3.1) are knobs whose defaults are the
    study's choice; ``shared.cnn_shape.KNOB_DEFAULTS`` repeats them for the network's own code.
    """

    #: added after campaigns were stored: at its default it is left out of a run's
    #: parameters, so the run's hash (and the results a twin campaign reuses) stay
    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"input"})

    epochs: int = Field(30, ge=1, le=MAX_COUNT)
    batch_size: int = Field(32, ge=2, le=MAX_COUNT)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    width: float = Field(1.0, gt=0, le=4)
    # at most [preprocessing] size too, checked with the campaign (parse_campaign)
    image_size: int = Field(224, ge=32, le=MAX_CACHE_SIZE, multiple_of=32)
    dropout: float = Field(0.5, ge=0, lt=1)
    augment: bool = True  # the study's flips, rotation, perspective and colour jitter
    norm_order: Literal["act_bn", "bn_act"] = "act_bn"  # act_bn: the study's R -> B
    activation: Literal["prelu", "relu", "leakyrelu"] = "prelu"
    pool: Literal["max", "conv"] = "max"  # conv: a 3x3 stride-2 conv instead of MaxPool2d(2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    # of the first conv in each block; at most image_size (see _stride_within_the_image)
    stride: int = Field(1, ge=1, le=MAX_CACHE_SIZE)
    # a string, because a list in the file is a sweep: dense = ["512,256,64", "512"]
    dense: Annotated[str, AfterValidator(_dense_widths)] = "512,256,64"
    compile: bool = False  # torch.compile the training step (CUDA only)
    # what the network sees of the 256 x 256 cache (study 1.2): crop, its centre 224 x 224
    # (the study's choice); resize, the whole image shrunk to 224 x 224 (what it beat)
    input: Literal["crop", "resize"] = "crop"

    @model_validator(mode="after")
    def _stride_within_the_image(self) -> CnnParams:
        # a 3x3 conv with padding 1 and a stride of at least the map's side leaves one
        # pixel, so every larger stride builds the same network; libtorch, handed one
        # such as 65536, crashes the worker (a segfault, or SIGFPE at 2**31 - 1)
        if self.stride > self.image_size:
            raise ValueError(
                f"stride ({self.stride}) must not exceed image_size ({self.image_size}): "
                "a stride of image_size already leaves the first convolution one pixel"
            )
        return self

    @model_validator(mode="after")
    def _a_network_that_fits(self) -> CnnParams:
        size = self.parameter_count()
        if size > MAX_CNN_PARAMETERS:
            raise ValueError(
                f'dense = "{self.dense}", width = {self.width:g}, image_size = '
                f"{self.image_size}: this network has {size:,} parameters, more than "
                f"{MAX_CNN_PARAMETERS:,} (the study's has {CnnParams().parameter_count():,}): "
                "make dense, width or image_size smaller, or stride larger"
            )
        return self

    def parameter_count(self, num_classes: int = 3) -> int:
        """The trainable parameters of the network these parameters build."""
        return Network.of(self.model_dump(), num_classes).parameters()


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A sweep runs each value once: a repeated value would plan the same unit twice."""
    for i, value in enumerate(values):
        if value in values[:i]:
            raise PydanticCustomError(
                "duplicate_sweep_value", "duplicate value {value}", {"value": repr(value)}
            )
    return values


def _some(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if not values:
        raise PydanticCustomError("empty_search", "give at least one value to search")
    return values


def _search_grid(item: Any) -> Any:
    """A grid of one searched parameter: its values, each once; () when not searched (a
    default: not validated, and not written out, so the stored campaign reads back; an
    empty list in the file is a mistake)."""
    return Annotated[
        tuple[item, ...],
        Field(strict=False, exclude_if=lambda values: values == ()),
        BeforeValidator(_as_list),  # one value is a list of one, as in a sweep
        AfterValidator(_some),
        AfterValidator(_distinct),
    ]


Gamma = Annotated[float, Field(gt=0)] | Literal["scale", "auto"]


class SvmSearch(_Frozen):
    """``[svm.search]``: parameters chosen inside each unit, as GridSearchCV chooses them.

    The unit splits its training images into ``folds`` stratified folds, scores every
    combination of the lists given here by its mean accuracy over them (the SVC fitted on
    the others), refits the best on all its training images and is judged, like any
    point, on its validation images: the study's section 2.4.1 (best C and gamma for
    each number of components, scored on its dev set). The PCA is fitted once on the
    unit's training images and sliced, as for a grid point (the study extracted the
    features first, then searched the SVC).
    """

    folds: int = Field(5, ge=2, le=MAX_FOLDS)
    n_components: _search_grid(Annotated[int, Field(ge=1, le=MAX_COUNT)]) = ()  # type: ignore[valid-type]
    C: _search_grid(Annotated[float, Field(gt=0)]) = ()  # type: ignore[valid-type]
    gamma: _search_grid(Gamma) = ()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _searches_something(self) -> SvmSearch:
        if not self.grid():
            raise ValueError("give at least one of n_components, C, gamma as a list to search")
        return self

    def grid(self) -> dict[str, tuple[Any, ...]]:
        """The searched parameters and their values, in field order (GridSearchCV's)."""
        return {
            name: values
            for name in ("n_components", "C", "gamma")
            if (values := getattr(self, name))
        }


def _a_limit_or_none(value: int) -> int:
    if value == 0:
        raise PydanticCustomError("no_iterations", "give -1 (no limit) or at least 1 iteration")
    return value


class SvmParams(_Frozen):
    """PCA + SVC (RBF, or linear) at one grid point.

    ``variant`` also takes the study's names: ``original``, ``polarized``, ``cropped``
    (see ``shared.variants``). Numbers are strict, as everywhere in a campaign: ``true``
    is not C = 1 and ``"200"`` is not 200; infinities are refused rather than handed to SVC.

    ``standardize`` centres each pixel feature and scales it to unit variance over the
    fold's training images before the PCA (sklearn's ``StandardScaler``); without it the
    features are the pixels in [0, 1]. It changes what a numeric ``gamma`` means: with
    it, ``gamma = "scale"`` comes to about 1 / (the explained share x the number of
    features), about 1e-5 for the study's 192 x 192 x 3 images at 100 components.
    """

    #: added after campaigns were stored: at its default it is left out of a point's
    #: parameters, so the point's hash (and the results a twin campaign reuses) stay
    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset(
        {"standardize", "search", "kernel", "max_iter"}
    )
    #: one table for the whole section, not a sweep dimension
    NOT_SWEPT: ClassVar[frozenset[str]] = frozenset({"search"})

    variant: Variant = "polar192"
    n_components: int = Field(200, ge=1, le=MAX_COUNT)
    whiten: bool = False
    standardize: bool = False
    C: float = Field(1.5, gt=0)
    gamma: Gamma = "scale"
    #: "linear": the study's first try (2.5), which did not converge; gamma is unused
    kernel: Literal["rbf", "linear"] = "rbf"
    #: the solver's iteration limit (SVC's max_iter; -1: none): a fit that reaches it
    #: stops before converging, which its point records (``stopped_at_max_iter``)
    max_iter: Annotated[int, AfterValidator(_a_limit_or_none)] = Field(-1, ge=-1, le=MAX_COUNT)
    search: SvmSearch | None = None

    @model_validator(mode="after")
    def _linear_searches_no_gamma(self) -> SvmParams:
        if self.kernel == "linear" and self.search is not None and self.search.gamma:
            # every combination would tie with its neighbours: fits for nothing
            raise ValueError("a linear kernel uses no gamma: leave gamma out of [svm.search]")
        return self

    @property
    def searched(self) -> frozenset[str]:
        """The parameters ``search`` chooses: a point leaves them out of its own."""
        return frozenset(self.search.grid()) if self.search is not None else frozenset()


def _none_word(value: Any) -> Any:
    """``"none"`` -> None: a TOML file's way to give an optional number its default."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


class RfParams(_Frozen):
    """One random forest: sklearn's RandomForestClassifier with OOB scores (``shared.forest``).

    ``augment`` adds flipped / rotated copies of the training images (2x, 4x, 8x);
    ``select_scaling`` keeps pixels whose importance in a ``select_estimators``-tree
    forest is at least ``scaling * median``; ``pca_components`` puts PCA before the
    forest; ``tree_shards`` trains the trees as that many tasks merged into one forest.
    """

    variant: Variant = "resize128"
    n_estimators: int = Field(100, ge=1, le=MAX_ESTIMATORS)
    # "none" in the file (TOML has no null): unlimited, sklearn's None, as a sweep's point
    max_depth: Annotated[int | None, BeforeValidator(_none_word)] = Field(None, ge=1, le=MAX_DEPTH)
    min_samples_leaf: int = Field(1, ge=1, le=MAX_COUNT)
    min_samples_split: int = Field(2, ge=2, le=MAX_COUNT)
    max_features: Annotated[float, Field(gt=0, le=1)] | Literal["sqrt", "log2"] = "sqrt"
    augment: Literal["none", "flip", "rotate", "rotate_flip"] = "none"
    select_scaling: float | None = Field(None, gt=0)
    select_estimators: int = Field(400, ge=1, le=MAX_ESTIMATORS)
    pca_components: int | None = Field(None, ge=1, le=MAX_COUNT)
    tree_shards: int = Field(1, ge=1, le=MAX_ESTIMATORS)

    @model_validator(mode="after")
    def _shards_have_trees(self) -> RfParams:
        if self.tree_shards > self.n_estimators:
            raise ValueError(
                f"tree_shards ({self.tree_shards}) must not exceed n_estimators "
                f"({self.n_estimators})"
            )
        return self

    @model_validator(mode="after")
    def _rotations_need_square_images(self) -> RfParams:
        half_height = canonical_variant(self.variant).startswith("polarcrop")
        if self.augment in ("rotate", "rotate_flip") and half_height:
            raise ValueError(
                f"augment {self.augment!r} rotates the images, which needs square ones: "
                f"variant {self.variant!r} is half as high as wide (use 'none' or 'flip')"
            )
        return self


# ---------------------------------------------------------------- sweep sections


def _one_table(value: Any) -> Any:
    """A section's sub-table (``[svm.search]``): one, not an array of tables."""
    if isinstance(value, list):
        if len(value) != 1:  # one is what a campaign stored by an earlier orchard holds
            raise PydanticCustomError(
                "one_table", "give one table, not a list of {count}", {"count": len(value)}
            )
        return value[0]
    return value


def _is_none(value: Any) -> bool:
    return value is None


def _sweep_section(name: str, params: type[_Frozen], default_folds: int) -> type[_Frozen]:
    """A section model whose fields are those of ``params``, each a non-empty tuple.

    A scalar in the file becomes a one-element tuple, so every field is a sweep
    dimension and errors point at ``field`` or ``field[i]``.
    """
    fields: dict[str, Any] = {
        "enabled": (bool, True),
        "folds": (int, Field(default_folds, ge=1)),
    }
    for field_name, info in params.model_fields.items():
        item = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        if field_name in getattr(params, "NOT_SWEPT", ()):
            # left out of the stored campaign when not given: its digest stays as it was
            one = Annotated[item, BeforeValidator(_one_table), Field(exclude_if=_is_none)]
            fields[field_name] = (one, info.default)
            continue
        sweep = Annotated[
            _items(item),
            BeforeValidator(_as_list),
            Field(min_length=1),
            AfterValidator(_distinct),
        ]
        fields[field_name] = (sweep, (info.default,))
    section = create_model(name, __base__=_Frozen, **fields)
    section.params_model = params  # type: ignore[attr-defined]
    return section


CnnSection = _sweep_section("CnnSection", CnnParams, default_folds=5)
SvmSection = _sweep_section("SvmSection", SvmParams, default_folds=1)
RfSection = _sweep_section("RfSection", RfParams, default_folds=1)

FAMILIES: dict[str, type[_Frozen]] = {"cnn": CnnParams, "svm": SvmParams, "rf": RfParams}


def sweep_points(section: _Frozen) -> list[dict[str, Any]]:
    """The cartesian product of a section's sweep dimensions, in file order."""
    params_model = type(section).params_model  # type: ignore[attr-defined]
    names = list(params_model.model_fields)
    single = getattr(params_model, "NOT_SWEPT", ())
    values = [[getattr(section, n)] if n in single else getattr(section, n) for n in names]
    points = []
    for combo in itertools.product(*values):
        # re-validate each point: cross-field rules live on the params model
        point = params_model(**dict(zip(names, combo, strict=True)))
        omit = {
            name
            for name in getattr(params_model, "OMIT_AT_DEFAULT", ())
            if getattr(point, name) == params_model.model_fields[name].default
        }
        omit |= getattr(point, "searched", frozenset())  # chosen in the unit, not given
        points.append(point.model_dump(exclude=omit))
    return points


def restore_omitted(family: str, params: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """``params`` with each of ``names`` that ``sweep_points`` left out at its default put
    back, in field order: where some points of a sweep have it, every point shows it."""
    model = FAMILIES.get(family)
    omitted = getattr(model, "OMIT_AT_DEFAULT", frozenset()) & names
    if model is None or not omitted:
        return dict(params)
    full = {
        name: params.get(name, field.default)
        for name, field in model.model_fields.items()
        if name in params or name in omitted
    }
    return {**full, **params}


def campaign_format(campaign: Campaign) -> int:
    """The format a campaign is stored with: the oldest that has every field it uses, so
    that a worker not yet updated still runs a campaign that uses none of the newer
    fields (a format that changes what every unit computes is every campaign's)."""
    report = campaign.report
    return 2 if report.published or report.published_in is not None else 1


class Published(NamedTuple):
    """A campaign's ``[[report.published]]`` figures, by what they are of."""

    # family -> a point's params hash (as the plan keys its units) -> figure -> value
    points: dict[str, dict[str, dict[str, float]]]
    # (family, "vote" or "mean") -> figure -> value, of the family's blend of its folds
    blends: dict[tuple[str, str], dict[str, float]]


#: The figures a blend's row has: its test and its validation accuracy.
BLEND_FIGURES = frozenset({"test_acc", "val_acc"})


def published_figures(campaign: Campaign) -> Published:
    """The campaign's ``[[report.published]]`` figures, each matched to the one sweep
    point whose parameters it names, or to its family's blend. The values are compared
    as the section's validation makes them (1 is 1.0; a variant is named as the section
    writes it). A figure that names no point, or several, or a parameter the section
    does not have, or a blend the report does not make, is one ``ValueError`` line
    naming the entry."""
    sections = dict(campaign.families())
    out = Published({}, {})
    given: dict[tuple[str, str, str], int] = {}  # (family, point or blend, figure) -> entry
    points: dict[str, list[tuple[dict[str, Any], _Frozen]]] = {}
    for i, entry in enumerate(campaign.report.published):
        where = f"[report] published[{i}]"
        family = entry.family
        if family is None:
            if len(sections) != 1:
                runs = ", ".join(sections) if sections else "none: the campaign runs no model"
                raise ValueError(f"{where}: give its family, one of {runs}")
            family = next(iter(sections))
        section = sections.get(family)
        if section is None:
            raise ValueError(f"{where} family: the campaign runs no [{family}] section")
        if entry.blend is not None:
            _check_blend(campaign, family, section, entry, where)
            for metric, value in entry.figures().items():
                _once(given, (family, entry.blend, metric), i, where)
                out.blends.setdefault((family, entry.blend), {})[metric] = value
            continue
        model = type(section).params_model  # type: ignore[attr-defined]
        for name in entry.params:
            if name not in model.model_fields or name in getattr(model, "NOT_SWEPT", ()):
                hint = difflib.get_close_matches(name, list(model.model_fields), n=1)
                guess = f" (did you mean {hint[0]}?)" if hint else ""
                raise ValueError(f"{where} params.{name}: [{family}] has no such parameter{guess}")
        if family not in points:
            # each point as JSON, which validates again (a python dump's tuples do not:
            # [svm.search]), with its omitted parameters back
            points[family] = [
                (point, model(**json.loads(json.dumps(point)))) for point in sweep_points(section)
            ]
        phash, problem = _published_point(family, model, points[family], entry.params)
        if problem:
            raise ValueError(f"{where} {problem}")
        for metric, value in entry.figures().items():
            _once(given, (family, phash, metric), i, where)
            out.points.setdefault(family, {}).setdefault(phash, {})[metric] = value
    return out


def _once(
    given: dict[tuple[str, str, str], int], key: tuple[str, str, str], i: int, where: str
) -> None:
    """Record that entry ``i`` gives a figure; a second entry giving it is refused."""
    if key in given:
        what = "the point" if key[1] not in ("vote", "mean") else f"the {key[1]} blend"
        raise ValueError(f"{where}: gives {key[2]} for {what} of published[{given[key]}] again")
    given[key] = i


def _check_blend(
    campaign: Campaign, family: str, section: _Frozen, entry: PublishedFigure, where: str
) -> None:
    """A blend's figures: of a family whose points have folds to blend, by a method the
    report blends them by, and only those its row has."""
    if entry.params:
        raise ValueError(
            f"{where} params: a blend is of the family's best point's folds: name no point"
        )
    if other := sorted(set(entry.figures()) - BLEND_FIGURES):
        raise ValueError(f"{where} {other[0]}: a blend's row has test_acc and val_acc only")
    folds = section.folds  # type: ignore[attr-defined]
    if folds < 2:
        raise ValueError(
            f"{where} blend: [{family}] folds = {folds}: its best point is one model, "
            "nothing is blended; quote it as a point, without blend"
        )
    if campaign.blend.method not in (entry.blend, "both"):
        raise ValueError(
            f'{where} blend: [blend] method = "{campaign.blend.method}" makes no '
            f"{entry.blend} of the folds"
        )


def _published_point(
    family: str,
    model: type[_Frozen],
    points: list[tuple[dict[str, Any], _Frozen]],
    params: dict[str, Any],
) -> tuple[str, str | None]:
    """(the params hash of the one point ``params`` names, None), or ("", why not: the
    entry's ``params`` or one of them, then the reason)."""
    named = ", ".join(f"{n} = {json.dumps(v)}" for n, v in params.items()) or "no parameters"
    matches: list[dict[str, Any]] = []
    invalid: ValidationError | None = None
    took = False
    for point, full in points:
        if searched := sorted(set(params) & set(getattr(full, "searched", ()))):
            return "", (
                f"params.{searched[0]}: [{family}.search] chooses it in each point; name "
                "the point by the parameters the section sweeps"
            )
        mine = full.model_dump(mode="json")
        try:
            merged = model(**{**mine, **params}).model_dump(mode="json")
        except ValidationError as exc:
            invalid = invalid or exc
            continue
        took = True  # a value some point takes: not a mistake in the value itself
        if merged == mine:
            matches.append(point)
    if len(matches) == 1:
        return params_hash({"family": family, **matches[0]}), None
    if matches:
        differ = [
            n
            for n in model.model_fields
            if len({json.dumps(p.get(n), default=str) for p in matches}) > 1
        ]
        return "", (
            f"params: {len(matches)} [{family}] points have {named}: name "
            f"{', '.join(differ) or 'more of their parameters'} too"
        )
    if invalid is not None and not took:  # no point took them: say what is wrong
        return "", f"params.{format_validation_error(invalid, params)}"
    return "", f"params: no [{family}] point has {named}"


# ---------------------------------------------------------------- dataset, preprocessing, blend


class SplitFiles(_Frozen):
    csv: Annotated[str, AfterValidator(_no_nul)]
    images: Annotated[str, AfterValidator(_no_nul)]


def _distinct_classes(classes: tuple[str, ...]) -> tuple[str, ...]:
    if not classes:
        raise ValueError("an empty list: give the labels, in their index order")
    if repeated := next((c for i, c in enumerate(classes) if c in classes[:i]), None):
        raise ValueError(f"{repeated!r} is listed twice")
    return classes


class AicupDataset(_Frozen):
    kind: Literal["aicup"]
    root: FilePath
    classes: Annotated[_items(str), AfterValidator(_distinct_classes)] = ("A", "B", "C")  # type: ignore[valid-type]
    splits: dict[Literal["train", "dev", "test"], SplitFiles] | None = None


class ImageFolderDataset(_Frozen):
    kind: Literal["imagefolder"]
    root: FilePath


class SyntheticDataset(_Frozen):
    """Generated mango photos in the aicup layout (see ``shared.synthetic``)."""

    kind: Literal["synthetic"]
    root: FilePath | None = None  # default: <artifacts>/datasets/synthetic-<params hash>
    seed: Seed = 0
    train_per_class: int = Field(40, ge=1, le=MAX_PER_CLASS)
    test_per_class: int = Field(10, ge=0, le=MAX_PER_CLASS)
    # a labelled dev split, for validation = "dev"
    dev_per_class: int = Field(0, ge=0, le=MAX_PER_CLASS)
    width: int = Field(320, ge=32, le=MAX_SYNTHETIC_SIDE)
    height: int = Field(240, ge=32, le=MAX_SYNTHETIC_SIDE)
    label_noise: float = Field(0.1, ge=0, le=1)
    test_labels: bool = True


DatasetSpec = Annotated[
    AicupDataset | ImageFolderDataset | SyntheticDataset, Field(discriminator="kind")
]


class PreprocessingSpec(_Frozen):
    size: int = Field(256, ge=32, le=MAX_CACHE_SIZE)
    shard_size: int = Field(256, ge=1, le=MAX_COUNT)
    # unreadable or missing images are skipped (and listed) up to this fraction; above, stop
    max_bad_fraction: float = Field(0.1, ge=0, lt=1)
    # decompression-bomb guard, checked from each image's header before decoding
    max_pixels: int = Field(100_000_000, ge=1, le=MAX_COUNT)
    # opencv: CPU workers (queue `preprocess`), libjpeg's reduced decoding; nvjpeg: GPU
    # workers (queue `gpu`) decode JPEGs with nvJPEG while they would wait (shared.nvjpeg)
    decoder: Literal["opencv", "nvjpeg"] = "opencv"


class BlendSpec(_Frozen):
    """How the report blends: each family's best point over its folds, and across families.

    ``vote`` is the study's uniform blending (majority vote), ``mean`` averages the
    members' class probabilities (families that predict labels only get "n/a"),
    ``both`` reports the two side by side. ``families`` are the families voted
    together in the cross-family blend, each by its best point's fold vote.
    """

    method: Literal["vote", "mean", "both"] = "both"
    families: _items(Literal["cnn", "svm", "rf"]) = ("cnn",)  # type: ignore[valid-type]


def _fraction(value: float) -> float:
    if not 0 <= value <= 1:
        hint = f" (write {value:g} % as {value / 100:g})" if 1 < value <= 100 else ""
        raise ValueError(f"{value:g} is not a fraction from 0 to 1{hint}")
    return value


#: An accuracy or a score as the report's tables hold it: 0.84125 for 84.125 %.
Fraction = Annotated[float, AfterValidator(_fraction)]

#: The figures a ``[[report.published]]`` entry may give, as the report's columns name
#: them: accuracies on the fold's training images, on its validation images and on the
#: test split, and a forest's ``oob_score_``.
PUBLISHED_METRICS: tuple[str, ...] = ("train_acc", "val_acc", "test_acc", "oob_score")


class PublishedFigure(_Frozen):
    """Figures published elsewhere (the study's tables) for one sweep point of the
    campaign, which the report's Experiments table shows beside the campaign's own.

    ``params`` names the point: enough of its parameters, as the section writes them, to
    tell it from the section's other points; ``family`` is needed only where the
    campaign has more than one model section. With ``blend`` the figures are the
    family's blend of its best point's folds (the Blending table's row), not a point's."""

    family: Literal["cnn", "svm", "rf"] | None = Field(None, exclude_if=_is_none)
    params: dict[str, Any] = Field(default_factory=dict, strict=False)
    # instead of a point: the family's blend of its best point's folds, by this method
    blend: Literal["vote", "mean"] | None = Field(None, exclude_if=_is_none)
    train_acc: Fraction | None = Field(None, exclude_if=_is_none)
    val_acc: Fraction | None = Field(None, exclude_if=_is_none)
    test_acc: Fraction | None = Field(None, exclude_if=_is_none)
    oob_score: Fraction | None = Field(None, exclude_if=_is_none)

    @model_validator(mode="after")
    def _some_figure(self) -> PublishedFigure:
        if all(getattr(self, name) is None for name in PUBLISHED_METRICS):
            raise ValueError(f"give at least one figure: {', '.join(PUBLISHED_METRICS)}")
        return self

    def figures(self) -> dict[str, float]:
        """metric -> value, of the figures it gives."""
        return {n: v for n in PUBLISHED_METRICS if (v := getattr(self, n)) is not None}


class ReportSpec(_Frozen):
    """The report's title, the LIME explanations of the best CNN (study 1.5), the
    t-SNE map of the SVM's features (study 2.4.2) and the figures published for some of
    the campaign's points (the study's tables), shown beside its own."""

    title: str | None = None
    lime: bool = True  # explain the best CNN fold on test images, when a CNN ran
    lime_per_class: int = Field(1, ge=0, le=10)  # test images explained per class
    lime_samples: int = Field(1000, ge=10, le=100_000)  # LIME's perturbed samples per image
    # embed fold 0's training images in 2-D, as the best SVM point's PCA features, by
    # t-SNE; off by default: it takes a while, and needs an SVM section
    tsne: bool = False
    tsne_images: int = Field(2000, ge=10, le=20_000)  # training images embedded at most
    # where the published figures come from, as the report names it ("the study, 1.3.1")
    published_in: str | None = Field(None, exclude_if=_is_none, max_length=200)
    published: _items(PublishedFigure) = Field((), exclude_if=lambda v: v == ())  # type: ignore[valid-type]


class Campaign(_Frozen):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    seed: Seed = 0
    folds: int = Field(5, ge=2, le=MAX_FOLDS)
    # "folds": validate on stratified folds drawn over the labelled train and dev images;
    # "dev": train on the train split, validate on the dev split (the study's 800), as
    # one fold (every model section has folds = 1);
    # "oob": forests only, as the study's section 3: each trains on every labelled train
    # and dev image and is validated out of bag (each image by the trees that did not
    # draw it), one fold
    validation: Literal["folds", "dev", "oob"] = "folds"
    dataset: DatasetSpec
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    cnn: CnnSection | None = None  # type: ignore[valid-type]
    svm: SvmSection | None = None  # type: ignore[valid-type]
    rf: RfSection | None = None  # type: ignore[valid-type]
    blend: BlendSpec = BlendSpec()
    report: ReportSpec = ReportSpec()

    def families(self) -> Iterator[tuple[str, Any]]:
        """(family, section) for each enabled model section, in a fixed order."""
        for family in FAMILIES:
            section = getattr(self, family)
            if section is not None and section.enabled:
                yield family, section

    def digest(self) -> str:
        """A hash of the whole validated campaign (not of the file's formatting)."""
        return params_hash(self.model_dump(mode="json"))


def _searched_twice(family: str, section: _Frozen, written: dict[str, Any] | None) -> str | None:
    """A parameter given in a section and in its ``search`` too: which one runs?

    ``written`` is the section as the file wrote it; without it (a stored campaign, which
    writes every field out), given means other than the default.
    """
    search = getattr(section, "search", None)
    defaults = type(section).model_fields
    for name in search.grid() if search is not None else ():
        given = (
            name in written
            if written is not None
            else getattr(section, name) != defaults[name].default
        )
        if given:
            return f"[{family}] {name}: [{family}.search] chooses it; give its values there only"
    return None


def params_hash(params: dict[str, Any], length: int = 12) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# ---------------------------------------------------------------- loading


def load_campaign(path: str | Path) -> Campaign:
    """Read and validate a campaign file; relative dataset roots are relative to the file."""
    path = Path(path)
    text = read_campaign_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{printable(path)}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise CampaignError(
            f"{printable(path)}: invalid TOML: arrays or inline tables nested too deeply"
        ) from None
    return parse_campaign(raw, source=str(path), base_dir=path.parent, as_written=True)


def read_campaign_text(path: Path) -> str:
    """A campaign file's text: a regular file of UTF-8 (a byte order mark, which editors
    on Windows often write, dropped) of at most :data:`MAX_CAMPAIGN_BYTES`; anything else
    is one :class:`CampaignError` line. A pipe or a device is refused from its ``stat``,
    never opened, so ``/dev/zero`` or a FIFO nobody writes to cannot hang the command."""
    name = printable(path)
    try:
        data = read_small_file(path, MAX_CAMPAIGN_BYTES)
    except NotRegularFileError as exc:
        raise CampaignError(f"{name}: not a regular file ({exc.kind})") from None
    except FileTooLargeError:
        raise CampaignError(
            f"{name}: too large for a campaign file (more than {MAX_CAMPAIGN_BYTES // 2**20} MiB)"
        ) from None
    except FileNotFoundError:
        raise CampaignError(f"{name}: no such campaign file") from None
    except OSError as exc:
        raise CampaignError(f"{name}: cannot read ({exc.strerror or exc})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        raise CampaignError(
            f"{name}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column "
            f"{column}); save it as UTF-8"
        ) from None


def _blend_problem(campaign: Campaign, written: dict[str, Any] | None) -> str | None:
    """In a campaign file (``written``; a stored campaign, already accepted, is not
    judged again): a family listed twice in ``[blend] families`` (a blend of a family
    with itself), or one the campaign does not train (its blend would only say "n/a")."""
    blend = written.get("blend") if written is not None else None
    if not isinstance(blend, dict) or "families" not in blend:
        return None  # the default, ["cnn"], blends nothing where no CNN trains
    families = campaign.blend.families
    for i, family in enumerate(families):
        if family in families[:i]:
            return f"[blend] families[{i}]: {family!r} is listed twice"
    trained = [name for name, _ in campaign.families()]
    for i, family in enumerate(families):
        if family not in trained:
            return (
                f"[blend] families[{i}]: {family!r}: the campaign trains no {family} (no "
                f"[{family}] section, or enabled = false); it trains "
                f"{', '.join(trained) or 'nothing'}"
            )
    return None


def parse_campaign(
    raw: dict[str, Any], *, source: str, base_dir: Path | None = None, as_written: bool = False
) -> Campaign:
    """Validate a campaign's dict. ``as_written``: ``raw`` is a file's, with only the keys
    its author wrote (a stored campaign has every field, defaults included)."""
    try:
        campaign = Campaign.model_validate(raw)
    except ValidationError as exc:
        raise CampaignError(f"{source}: {format_validation_error(exc, raw)}") from None
    for family, section in campaign.families():
        try:
            sweep_points(section)
        except ValidationError as exc:
            raise CampaignError(
                f"{source}: {format_validation_error(exc, raw.get(family, {}), section=family)}"
            ) from None
        written = raw.get(family) if as_written and isinstance(raw.get(family), dict) else None
        if problem := _searched_twice(family, section, written):
            raise CampaignError(f"{source}: {problem}")
        if campaign.validation == "oob" and family != "rf":
            model = {"cnn": "a CNN", "svm": "an SVM"}[family]
            raise CampaignError(
                f'{source}: [{family}]: validation = "oob" judges forests by the trees that '
                f"did not draw each image, and {model} has none: run [{family}] in a "
                'campaign with validation = "folds" or "dev"'
            )
        if campaign.validation == "oob" and family == "rf" and section.select_scaling != (None,):
            raise CampaignError(
                f'{source}: [rf] select_scaling: validation = "oob" judges each image by trees '
                "that did not draw it, but the selection forest saw every image's label: "
                'validate feature selection with validation = "folds" or "dev"'
            )
        if campaign.validation in ("dev", "oob") and section.folds != 1:
            where = "on the dev split" if campaign.validation == "dev" else "out of bag"
            raise CampaignError(
                f'{source}: [{family}] folds: validation = "{campaign.validation}" validates '
                f"every model {where}, one fold: set [{family}] folds = 1 (it is "
                f"{section.folds})"
            )
        if section.folds > campaign.folds:
            raise CampaignError(
                f"{source}: [{family}] folds: {section.folds} is more than the campaign's "
                f"folds = {campaign.folds}"
            )
        if problem := _variant_problem(family, section, campaign.preprocessing.size, raw):
            raise CampaignError(f"{source}: {problem}")
        if problem := _image_size_problem(family, section, campaign.preprocessing.size, raw):
            raise CampaignError(f"{source}: {problem}")
    if problem := _blend_problem(campaign, raw if as_written else None):
        raise CampaignError(f"{source}: {problem}")
    try:
        published_figures(campaign)
    except ValueError as exc:
        raise CampaignError(f"{source}: {exc}") from None
    root = getattr(campaign.dataset, "root", None)
    if root is None:
        return campaign
    written = root
    try:
        root = expand_home(root)
    except ValueError as exc:
        raise CampaignError(f"{source}: [dataset] root: {exc}") from None
    relative = base_dir is not None and not root.is_absolute()
    if relative:
        root = base_dir / root
    try:
        # also an absolute root: a symlink loop stops here, not in a worker
        resolved = root.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CampaignError(
            f"{source}: [dataset] root: cannot resolve {str(written)!r}: {_resolve_problem(exc)}"
        ) from None
    # made absolute with its symlinks kept, the path every host mounts the data at (a
    # symlink may lead elsewhere on a worker than here), unless '..' after a symlink
    # makes the plain path another folder (or none)
    plain = Path(os.path.abspath(root))
    recorded = plain if plain.resolve() == resolved else resolved
    if recorded != written:
        dataset = campaign.dataset.model_copy(update={"root": recorded})
        campaign = campaign.model_copy(update={"dataset": dataset})
    return campaign


def _resolve_problem(exc: BaseException) -> str:
    """Why a path did not resolve, without the exception's own quoting of the path."""
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop)"
    return getattr(exc, "strerror", None) or str(exc)


def _variant_problem(family: str, section: Any, cache_size: int, raw: dict[str, Any]) -> str | None:
    """A section's variant the preprocessing cache is too small for (a crop larger
    than ``[preprocessing] size``), or one a sweep already has under another name (an
    alias: ``original`` is ``resize192``), as ``[rf] variant: ...``; None if all fit."""
    swept = isinstance(raw.get(family, {}).get("variant"), list)
    seen: dict[str, str] = {}
    for i, variant in enumerate(getattr(section, "variant", ())):
        where = f"[{family}] variant" + (f"[{i}]" if swept else "")
        try:
            check_variant(variant, cache_size)
        except ValueError as exc:
            return f"{where}: {exc} ([preprocessing] size = {cache_size})"
        same = seen.setdefault(canonical_variant(variant), variant)
        if same != variant:
            return (
                f"{where}: {variant!r} is the same variant as {same!r} "
                f"({canonical_variant(variant)}): the sweep would run its points twice"
            )
    return None


def _image_size_problem(
    family: str, section: Any, cache_size: int, raw: dict[str, Any]
) -> str | None:
    """A CNN ``image_size`` larger than the cache it is cut from, which would feed the
    network an upsampled image (and hold it on the device at that size); None if none."""
    swept = isinstance(raw.get(family, {}).get("image_size"), list)
    for i, size in enumerate(getattr(section, "image_size", ())):
        if size > cache_size:
            where = f"[{family}] image_size" + (f"[{i}]" if swept else "")
            return (
                f"{where}: {size} is larger than the cached images it is cut from "
                f"([preprocessing] size = {cache_size}): at most {cache_size}, or raise "
                "[preprocessing] size"
            )
    return None


def format_validation_error(
    exc: ValidationError, raw: dict[str, Any], section: str | None = None
) -> str:
    """Pydantic's errors as ``[section] field: message (got value)``, joined on one line."""
    messages: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = list(err["loc"])
        if section is not None:
            loc.insert(0, section)
        missing = err["type"] == "missing"
        where = _describe_loc(loc, raw if section is None else {section: raw}, missing=missing)
        msg = err["msg"]
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            # a table whose kind is missing or unknown ([dataset]): say which kinds there are
            key = str(err["ctx"]["discriminator"]).strip("'")
            where, kinds = f"{where} {key}", str(err["ctx"].get("expected_tags", ""))
            kinds = kinds or ", ".join(repr(k) for k in _kinds(loc))
            msg = "required but missing" if err["type"] == "union_tag_not_found" else "unknown"
            msg = f"{msg}: one of {kinds}"
            if "tag" in err["ctx"]:
                msg += f" (got {err['ctx']['tag']!r})"
        elif (
            err["type"] == "extra_forbidden" and len(loc) == 1 and isinstance(raw.get(loc[0]), dict)
        ):
            # a table of the file's top level: [svn]
            where, msg = f"[{loc[0]}]", "unknown table"
            if guess := difflib.get_close_matches(str(loc[0]), sorted(_TABLES), n=1):
                msg += f" (did you mean [{guess[0]}]?)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key" + _unknown_key_hint(loc, raw if section is None else {section: raw})
        elif missing:
            msg = "required but missing"
        else:
            if err["type"] == "string_pattern_mismatch" and loc == ["name"]:
                msg = (
                    "only lowercase letters, digits, '_' and '-', starting with a letter or a "
                    "digit, at most 48 characters"
                )
            elif err["type"] == "value_error":
                msg = str(err["ctx"]["error"])  # a validator's own sentence, no "Value error, "
            elif err["type"] in ("model_type", "model_attributes_type"):
                msg = "expected a table"  # not pydantic's name for the model
            elif err["type"] == "too_short" and err["ctx"].get("actual_length") == 0:
                msg = "an empty list: give at least one value"
            if "input" in err and not isinstance(err["input"], dict | list | tuple):
                msg = f"{msg} (got {err['input']!r})"
        messages.setdefault(where, [])
        if msg not in messages[where]:
            messages[where].append(msg)
    return "; ".join(f"{where}: {_either(msgs)}" for where, msgs in messages.items())


def _either(messages: list[str]) -> str:
    """A value's messages, one per kind it may be (``gamma``: a number, or 'scale' or
    'auto'), as one sentence: ``Input should be a valid number or 'scale' or 'auto'
    (got 'Scale')``, not each with its own "Input should be" and "(got ...)"."""
    if len(messages) < 2:
        return " or ".join(messages)
    found = re.search(r" \(got .*\)$", messages[0])
    got = found.group() if found and all(m.endswith(found.group()) for m in messages) else ""
    messages = [m.removesuffix(got) for m in messages] if got else messages
    lead = "Input should be "
    if all(m.startswith(lead) for m in messages):
        messages = [messages[0], *(m.removeprefix(lead) for m in messages[1:])]
    return " or ".join(messages) + got


_TABLES = {"dataset", "preprocessing", "cnn", "svm", "rf", "blend", "report"}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation allows (through Optional, unions and
    Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _kinds(loc: list[Any]) -> list[Any]:
    """The kinds a table at the top of the file may be (``[dataset]``'s)."""
    if len(loc) != 1 or loc[0] not in Campaign.model_fields:
        return []
    return [_kind_of(m) for m in _models_in(Campaign.model_fields[loc[0]].annotation)]


def _table_of(loc: list[Any], raw: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """The file's table at ``loc`` (empty if none) and ``loc`` without the tag of a
    table's kind that pydantic puts in the path (``[dataset, aicup, seed]``)."""
    section = raw.get(loc[0]) if loc and isinstance(raw.get(loc[0]), dict) else {}
    if len(loc) == 3 and loc[0] in _TABLES and loc[1] == section.get("kind"):
        loc = [loc[0], loc[2]]
    return section, loc


def _unknown_key_hint(loc: list[Any], raw: dict[str, Any]) -> str:
    """Why a key is unknown where it is, when that is likelier than a typo: a key of
    another kind of the table (a synthetic ``seed`` in an aicup ``[dataset]``), or a
    name of the file's top level written inside a table; else the closest known key."""
    section, loc = _table_of(loc, raw)
    key = str(loc[-1])
    kind = section.get("kind")
    if len(loc) == 2 and loc[0] in _TABLES:  # a key of the table itself, not deeper
        options = _models_in(Campaign.model_fields[loc[0]].annotation)
        others = [_kind_of(m) for m in options if _kind_of(m) != kind and key in m.model_fields]
        if kind is not None and others:
            kinds = " or ".join(repr(k) for k in others)
            return f" for kind {kind!r} (a key of kind {kinds})"
        if key in _TABLES:
            return f" ([{key}] is a table of its own, not a key of [{loc[0]}])"
        if key in Campaign.model_fields:
            return f" ({key} is set at the top of the file, before any table)"
    if guess := _close_key(loc, raw):
        return f" (did you mean {guess!r}?)"
    return ""


def _close_key(loc: list[Any], raw: dict[str, Any]) -> str | None:
    """The known key most like the unknown one at ``loc`` (top level, or a section's
    field), for "did you mean"; None when none is close or the place is deeper."""
    model: type[BaseModel] = Campaign
    section, loc = _table_of(loc, raw)
    if len(loc) == 2 and loc[0] in _TABLES:
        options = _models_in(Campaign.model_fields[loc[0]].annotation)
        kind = [m for m in options if _kind_of(m) == section.get("kind")]
        if len(kind) == 1 or len(options) == 1:
            model = (kind or options)[0]
        else:
            return None
    elif len(loc) != 1:
        return None
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return matches[0] if matches else None


def _kind_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    args = get_args(field.annotation) if field is not None else ()
    return args[0] if args else None


def _describe_loc(loc: list[Any], raw: dict[str, Any], *, missing: bool = False) -> str:
    """Where an error is, as the file has it: ``[section] field[i].key``; ``missing``:
    the last name is a key the file lacks (shown, where other names must be in it)."""
    if not loc:
        return "campaign"
    head, rest = loc[0], loc[1:]
    if head not in _TABLES or not rest:
        return f"[{head}]" if head in _TABLES else str(head)
    section_raw = raw.get(head, {}) if isinstance(raw.get(head), dict) else {}
    if head == "dataset" and rest and rest[0] == section_raw.get("kind") and len(rest) > 1:
        rest = rest[1:]  # pydantic puts the discriminator's tag in the path
    field = str(rest[0])
    where = f"[{head}] {field}"
    # deeper: [dataset.splits.train] csv -> "[dataset] splits.train.csv", [svm.search]
    # C[1] -> "[svm] search.C[1]"; an index the file has no list for is the sweep's
    # wrapper of a single value, and a name that is not a key of the file's table is
    # pydantic's tag for one member of a union: neither is shown
    node: Any = section_raw.get(field)
    parts = rest[1:]
    for i, part in enumerate(parts):
        if isinstance(part, int) and isinstance(node, list):
            where += f"[{part}]"
            node = node[part] if 0 <= part < len(node) else None
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            where += f".{part}"
            node = node[part]
        elif isinstance(part, str) and missing and i == len(parts) - 1:
            where += f".{part}"
        elif not isinstance(part, int):
            break
    return where
