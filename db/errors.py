"""What the store raises: one line each, the database's URL masked."""

from __future__ import annotations

from datetime import datetime

from shared.errors import OrchardError, UnreachableError


class StoreError(OrchardError):
    """The store is unreachable, not initialised, or asked for something absent."""


class StoreUnreachableError(StoreError, UnreachableError):
    """The database did not answer for the whole retry budget (connection refused or
    lost, a server restarting or failing over, a lock held too long): nothing was wrong
    with what was asked, and asking again later may succeed."""


class SchemaError(StoreError):
    """The store's schema is not this orchard's: older (``orchard db upgrade`` mends it),
    newer (the orchard that upgraded it must run), or not there yet."""


class NotFoundError(StoreError):
    """No such campaign or unit: asking again cannot help."""


class CampaignDeletedError(NotFoundError):
    """The campaign was in this store, and ``orchard delete`` removed it."""

    def __init__(self, campaign_id: str, deleted_at: datetime) -> None:
        super().__init__(
            f"campaign {campaign_id} was deleted (`orchard delete`) at "
            f"{deleted_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        self.deleted_at = deleted_at


class UnitCancelledError(OrchardError):
    """``finish_unit`` on a unit that ``orchard cancel`` stopped: nothing is written."""


class LeaseLostError(OrchardError):
    """``finish_unit`` by a delivery that no longer holds its unit (another delivery
    took it over, or ``orchard resume`` reset it): nothing is written."""


class DeleteRefusedError(OrchardError):
    """``delete_campaign`` of a campaign that something still uses: it runs, a worker
    may still be stopping one of its units, or another campaign reuses its results."""


class BeingDeletedError(OrchardError):
    """``resume_campaign`` of a campaign whose delete began and did not finish."""

    def __init__(self, campaign_id: str) -> None:
        super().__init__(
            f"campaign {campaign_id} is being deleted: `orchard delete {campaign_id}` "
            "finishes a delete that stopped midway"
        )
