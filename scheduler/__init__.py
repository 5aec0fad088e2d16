"""orchard's scheduler: campaign files in, Celery canvas out; the API and the CLI.

from scheduler import submit
run = submit("campaigns/quick.toml")
run.wait(progress=True)
"""

from scheduler.api import CampaignRun, cancel, delete, resume, submit

__all__ = ["CampaignRun", "cancel", "delete", "resume", "submit"]
