"""orchard's scheduler: campaign files in, Celery canvas out; the API and the CLI.

from scheduler import submit
run = submit("campaigns/quick.toml")
run.wait(progress=True)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.api import (
        CampaignRun,
        WaitTimeout,
        attach,
        cancel,
        delete,
        prune_cache,
        resume,
        submit,
    )

__all__ = [
    "CampaignRun",
    "WaitTimeout",
    "attach",
    "cancel",
    "delete",
    "prune_cache",
    "resume",
    "submit",
]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever scheduler.api holds
    """``from scheduler import submit`` imports scheduler.api (SQLAlchemy, Celery) only
    then: `orchard`, whose entry point is in this package, starts without it, and a
    Ctrl-C while it loads is one line (scheduler.launch), not a traceback."""
    if name in __all__:
        from scheduler import api

        return getattr(api, name)
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
