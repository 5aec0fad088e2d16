"""unit parameter values as TEXT on SQLite: a column declared JSON has numeric affinity
there, which stored the JSON text ``1.0`` as the integer 1 (``[rf] max_features = 1.0``,
all features, read back as 1, one feature)

The values SQLite turned into integers are mended where the unit's params hash tells
what they were: the hash was taken of the parameters as submitted, so the one choice
of which integers were written as floats that gives the same hash is what the campaign
file said. PostgreSQL's ``json`` kept them already: nothing changes there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The most integer-valued parameters of one unit whose float spellings are tried (2^n
#: hashes): a sweep point has a handful.
MAX_TRIED = 8


def _hash(params: dict[str, Any]) -> str:
    """``shared.spec.params_hash`` as every orchard up to this revision computed it."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_submitted(family: str, params: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """``params`` with the integers that were floats made floats again, or None where no
    choice gives ``digest`` (nothing to mend, or a unit planned some other way)."""
    salted = {} if family in ("preprocess", "report") else {"family": family}
    ints = [k for k, v in params.items() if type(v) is int]
    if not ints or len(ints) > MAX_TRIED or _hash({**salted, **params}) == digest:
        return None
    for count in range(1, len(ints) + 1):
        for chosen in itertools.combinations(ints, count):
            trial = {**params, **{k: float(params[k]) for k in chosen}}
            if _hash({**salted, **trial}) == digest:
                return trial
    return None


def _mend_numbers(bind: sa.Connection) -> None:
    units = {
        uid: (family, digest)
        for uid, family, digest in bind.execute(
            sa.text("SELECT id, family, params_hash FROM units")
        )
    }
    params: dict[int, dict[str, Any]] = defaultdict(dict)
    for uid, name, value in bind.execute(sa.text("SELECT unit_id, name, value FROM unit_params")):
        params[uid][name] = json.loads(value) if isinstance(value, str) else value
    for uid, values in params.items():
        family, digest = units[uid]
        mended = _as_submitted(family, values, digest)
        for name in mended or {}:
            if type(mended[name]) is not type(values[name]):  # an int made a float again
                bind.execute(
                    sa.text("UPDATE unit_params SET value = :v WHERE unit_id = :u AND name = :n"),
                    {"v": json.dumps(mended[name]), "u": uid, "n": name},
                )


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    # the rebuild copies each REAL as SQLite's text of it, 15 significant digits
    # (0.31622776601683794 -> '0.316227766016838'): written back as Python's, exact
    reals = bind.execute(
        sa.text("SELECT id, value FROM unit_params WHERE typeof(value) = 'real'")
    ).all()
    with op.batch_alter_table("unit_params") as batch:
        batch.alter_column("value", type_=sa.Text(), existing_type=sa.JSON())
    for row_id, value in reals:
        bind.execute(
            sa.text("UPDATE unit_params SET value = :v WHERE id = :i"),
            {"v": json.dumps(value), "i": row_id},
        )
    _mend_numbers(bind)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("unit_params") as batch:
        batch.alter_column("value", type_=sa.JSON(), existing_type=sa.Text())
