"""orchard's scheduler: campaign files in, Celery canvas out; the API and the CLI.

from scheduler import submit
run = submit("campaigns/quick.toml")
run.wait(progress=True)
"""

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
