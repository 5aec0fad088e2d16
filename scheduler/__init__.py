"""orchard's scheduler: campaign files in, Celery canvas out; the API and the CLI.

from scheduler import submit
run = submit("campaigns/quick.toml")
run.wait(progress=True)
"""

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.api import CampaignRun, WaitTimeout, attach, cancel, resume, submit
    from scheduler.cleanup import delete, prune_cache

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


# a library's: what it logs (scheduler.canvas, in a worker) goes where the program
# sends it, and nowhere in a command that sets up no logging (not Python's last resort)
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever scheduler.api holds
    """``from scheduler import submit`` imports scheduler.api (SQLAlchemy, Celery) only
    then: `orchard`, whose entry point is in this package, starts without it, and a
    Ctrl-C while it loads is one line (scheduler.launch), not a traceback. The
    submodules too (``scheduler.api`` after ``import scheduler``)."""
    if name in __all__:
        home = "cleanup" if name in ("delete", "prune_cache") else "api"
        return getattr(importlib.import_module(f"{__name__}.{home}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # one the submodule imports: its own error
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
