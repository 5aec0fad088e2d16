"""orchard's Celery side: the app, its configuration, and thin task wrappers."""
