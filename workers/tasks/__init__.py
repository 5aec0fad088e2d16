"""One module per family; each task is a thin wrapper made by :func:`base.unit_task`."""
