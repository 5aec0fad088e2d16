"""A message with an ETA (a ``task.retry(countdown=...)``) keeps the prefetch slot it was
fetched into (``workers.etaslot``), on a real Celery worker run in a thread of the test
(the in-memory broker): its consumer, strategy, timer and kombu QoS are Celery's own."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery import _state as celery_state
from celery.contrib.testing.worker import TestWorkController, test_worker_started
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu.common import QoS

from shared.settings import Settings
from workers.app import make_app
from workers.etaslot import EtaKeepsItsSlot, keep_prefetch_count

RAN: list[str] = []


def wait_until(condition: Any, what: str, timeout: float = 15) -> None:  # noqa: ANN401
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def orchard_app(tmp_path: Path) -> Celery:
    """The workers' app (``make_app``: orchard's settings and bootsteps) on the in-memory
    broker, with a task that only records that it ran."""
    settings = Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
        artifacts=tmp_path / "artifacts",
    )
    return with_test_task(make_app(settings))


def plain_app() -> Celery:
    """A Celery app with orchard's prefetch settings and no bootstep of orchard's."""
    app = Celery("etaslot-plain", broker="memory://", set_as_current=False)
    app.conf.update(
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return with_test_task(app)


def with_test_task(app: Celery) -> Celery:
    # the in-memory broker looks for messages every second by default
    app.conf.broker_transport_options = {"polling_interval": 0.02}

    @app.task(name="orchard_test.etaslot.later", shared=False)
    def later(tag: str) -> None:
        RAN.append(tag)

    return app


@contextmanager
def running_worker(
    app: Celery, queue: str, *, pool: str = "solo", concurrency: int = 1
) -> Iterator[Any]:
    """A real worker of ``app`` consuming ``queue``, started in a thread; stopped warm.
    ``app`` is the process's default app meanwhile, as Celery's own embedded worker makes
    it: the pool looks the task up there (its timer thread and pool threads have no
    current app of their own)."""
    app.finalize()
    default_app = celery_state.default_app
    app.set_default()
    started = threading.Event()

    def on_started(sender: Any = None, **_: Any) -> None:  # noqa: ANN401
        if sender is app:
            started.set()

    test_worker_started.connect(on_started, weak=False)
    worker = TestWorkController(
        app=app,
        hostname=f"etaslot-{secrets.token_hex(3)}@test",
        pool=pool,
        concurrency=concurrency,
        queues=[queue],
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="etaslot test worker", daemon=True)
    thread.start()
    try:
        assert started.wait(30), "the worker did not start within 30 s"
        yield worker
    finally:
        test_worker_started.disconnect(on_started)
        worker_state.should_stop = 0  # a warm shutdown: every step's stop runs
        thread.join(30)
        worker_state.should_stop = None
        celery_state.set_default_app(default_app)
        assert not thread.is_alive(), "the worker did not stop within 30 s"


#: An ETA message's countdown in these tests: it must still be held (not yet due) when
#: the test looks, which a loaded machine may delay by a second or more
HELD_FOR = 3.0


def hold_an_eta_message(app: Celery, worker: Any, queue: str, countdown: float) -> str:  # noqa: ANN401
    """Send a task with ``countdown`` and wait until the worker holds it, not yet due."""
    tag = secrets.token_hex(4)
    task = app.tasks["orchard_test.etaslot.later"]
    sent = task.apply_async((tag,), countdown=countdown, queue=queue)
    wait_until(
        lambda: any(r.id == sent.id for r in worker_state.scheduled_requests),
        "the worker to hold the ETA message",
    )
    assert tag not in RAN  # held, not run
    return tag


def test_celery_still_raises_the_prefetch_count_for_each_eta_message_it_holds() -> None:
    """What the step undoes, on a plain worker: while it holds an ETA message, Celery's
    strategy raises the consumer's prefetch count by one (``qos.increment_eventually``),
    and ``Consumer.apply_eta_task`` lowers it back when the message is due
    (``qos.decrement_eventually``). Should a Celery release stop doing so, or rename
    what the step relies on, this says so."""
    app, queue = plain_app(), f"etaslot-{secrets.token_hex(4)}"
    with running_worker(app, queue) as worker:
        c = worker.consumer
        assert isinstance(c.qos, QoS) and c.qos.value == c.initial_prefetch_count == 1
        assert c.controller is worker and hasattr(c.qos, "_mutex")
        tag = hold_an_eta_message(app, worker, queue, countdown=HELD_FOR)
        assert c.qos.value == 2  # room for another message beside the held one
        wait_until(lambda: tag in RAN, "the ETA message to run")
        wait_until(lambda: c.qos.value == 1, "the prefetch count to come back to 1")


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("threads", 2)])
def test_a_held_eta_message_keeps_the_slot_it_was_fetched_into(
    tmp_path: Path, pool: str, concurrency: int
) -> None:
    app, queue = orchard_app(tmp_path), f"etaslot-{secrets.token_hex(4)}"
    with running_worker(app, queue, pool=pool, concurrency=concurrency) as worker:
        c = worker.consumer
        assert c.qos.value == concurrency  # concurrency x prefetch multiplier 1
        tag = hold_an_eta_message(app, worker, queue, countdown=HELD_FOR)
        assert c.qos.value == concurrency  # nothing more is fetched beside it
        c.qos.update()  # what the event loop sends the broker
        assert c.task_consumer.channel.qos.prefetch_count == concurrency
        wait_until(lambda: tag in RAN, "the ETA message to run")
        time.sleep(0.1)
        assert c.qos.value == concurrency  # neither lowered when it ran
        names = [type(step).__name__ for step in c.steps]
        # the consumer's blueprint starts its steps in this order on every connection
        assert "EtaKeepsItsSlot" in names
        assert names.index("Tasks") < names.index("EtaKeepsItsSlot")


@pytest.mark.filterwarnings("ignore::celery.exceptions.CPendingDeprecationWarning")
def test_a_reconnection_keeps_it(tmp_path: Path) -> None:
    """A lost broker connection makes the consumer start its steps again, the task
    consumer's QoS anew among them: the new one keeps the count too."""
    app, queue = orchard_app(tmp_path), f"etaslot-{secrets.token_hex(4)}"
    with running_worker(app, queue) as worker:
        c = worker.consumer
        first_qos, restarts = c.qos, c.restart_count

        def connection_lost(*_: Any, **__: Any) -> None:  # noqa: ANN401
            raise c.connection_errors[0]("connection lost (test)")

        c.connection.drain_events = connection_lost
        wait_until(
            lambda: c.restart_count > restarts and c.qos is not first_qos and c.task_consumer,
            "the consumer to reconnect",
        )
        time.sleep(0.3)  # its event loop running again
        tag = hold_an_eta_message(app, worker, queue, countdown=HELD_FOR)
        assert c.qos.value == 1
        wait_until(lambda: tag in RAN, "the ETA message to run")
        assert c.qos.value == 1


def fake_consumer(initial: int, autoscaler: object = None) -> SimpleNamespace:
    c = SimpleNamespace(
        qos=QoS(lambda prefetch_count: None, initial),
        initial_prefetch_count=initial,
        prefetch_multiplier=1,
        pool=SimpleNamespace(num_processes=initial),
        controller=SimpleNamespace(autoscaler=autoscaler, autoscale=None),
    )
    c._update_qos_eventually = lambda index: Consumer._update_qos_eventually(c, index)
    return c


def test_a_pool_that_grows_or_shrinks_still_moves_the_count() -> None:
    """``pool_grow`` / ``pool_shrink`` (remote control) grow or shrink the pool, then
    have Celery's ``Consumer._update_prefetch_count`` set the consumer's count and call
    the QoS's increment / decrement: the count follows the pool."""
    c = fake_consumer(2)
    keep_prefetch_count(c)
    assert c.qos.increment_eventually() == 2  # an ETA message held
    c.pool.num_processes = 3
    Consumer._update_prefetch_count(c, 1)
    assert c.qos.value == c.initial_prefetch_count == 3
    c.pool.num_processes = 1
    Consumer._update_prefetch_count(c, -2)
    assert c.qos.value == c.initial_prefetch_count == 1
    off = fake_consumer(0)  # prefetch off stays off
    keep_prefetch_count(off)
    assert off.qos.increment_eventually() == 0


def test_it_leaves_an_autoscaling_worker_alone() -> None:
    c = fake_consumer(2, autoscaler=object())
    EtaKeepsItsSlot(c).start(c)
    assert c.qos.increment_eventually() == 3  # kombu's own
