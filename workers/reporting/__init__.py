"""Gathering the report's numbers from the store's values: what the report task
(:mod:`workers.tasks.report`) hands to :mod:`shared.report` to lay out."""
