"""A campaign's folder under ``<artifacts>/campaigns/``: named by the campaign's id, and
marked while a submit or a delete is under way, so that what a killed one leaves is
known for what it is."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from shared.manifest import manifest_path

#: A campaign id: what :func:`scheduler.api.new_campaign_id` makes, or one chosen with
#: ``submit --id``.
CAMPAIGN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,79}")
#: What :func:`scheduler.api.new_campaign_id` makes: the name, the UTC time, four hex
#: digits.
MADE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")


#: In a campaign's folder from before its manifest is written until the campaign is
#: recorded: one the store has no campaign of, with the mark an hour old, is what a
#: killed submit left.
SUBMITTING_MARK = ".submitting"

#: In a campaign's folder from just before its rows are deleted: the folder of a
#: campaign the store no longer has, even with its manifest, is a deleted one's.
DELETING_MARK = ".deleting"

#: How long a submit's mark, or a shard's or a dataset's temporary file, must have been
#: left untouched before `orchard prune` takes it for a killed submit's or worker's: a
#: write in progress touches it every moment, and no campaign runs meanwhile (a prune
#: is refused then).
STALE_WRITE_SECONDS = 3600


def unmark(folder: Path) -> None:
    """The campaign is recorded: its folder is its own now (a mark left behind is
    harmless, the store names the campaign)."""
    with contextlib.suppress(OSError):
        (folder / SUBMITTING_MARK).unlink()


def abandoned_submit(folder: Path) -> bool:
    """A campaign folder a submit killed before recording left (its mark untouched for
    :data:`STALE_WRITE_SECONDS`); the caller knows the store has no such campaign."""
    try:
        marked = (folder / SUBMITTING_MARK).lstat().st_mtime
    except OSError:
        return False
    return not folder.is_symlink() and marked < time.time() - STALE_WRITE_SECONDS


def left_by_a_killed_submit(folder: Path) -> bool:
    """A campaign folder that holds the mark of a submit under way and nothing else but
    its manifest (or the temporary file of one being written): no unit of it ever ran.
    Without the mark it is a recorded campaign's, perhaps another store's."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return False
    manifest = manifest_path(folder).name
    return SUBMITTING_MARK in names and all(
        name in (manifest, SUBMITTING_MARK) or name.endswith(".tmp") for name in names
    )
