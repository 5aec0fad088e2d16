"""Fixtures of the integration tests (real Redis, real `orchard worker` processes)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.integration.test_campaign import drop_redis_keys


@pytest.fixture
def redis_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Redis key prefix of this test's own, in ORCHARD_REDIS_PREFIX (the workers and
    services it starts inherit it): other users of this Redis never see its queues.
    Its keys are deleted afterwards."""
    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    monkeypatch.setenv("ORCHARD_REDIS_PREFIX", prefix)
    yield prefix
    drop_redis_keys(prefix)
