"""orchard's pure library: campaign spec, datasets, preprocessing, models, fits, metrics, reports.

Nothing in this package may import Celery, kombu, redis or SQLAlchemy
(``tests/shared/test_import_contract.py`` enforces it): the ML code never knows
it runs on a task queue.
"""
