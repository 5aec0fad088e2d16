"""orchard's SQL store: SQLAlchemy 2.x models, one-transaction methods, Alembic migrations."""

from db.store import Store, StoreError

__all__ = ["Store", "StoreError"]
