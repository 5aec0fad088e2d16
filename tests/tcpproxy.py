"""A TCP forwarder a test can take down and bring back: a database "briefly unreachable".

While down, every connection is cut at once (accepted, then reset: what a client of a
database server that is shutting down or restarting gets) and counted in ``refused``;
the connections it was forwarding are cut, as when a database server restarts.

Its port is bound once, in the constructor, and held until :meth:`close` (or until the
proxy is garbage-collected): taking the proxy down never releases it, so no other
process (another test run in parallel) can take it in the meantime.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import weakref
from collections.abc import Iterable


class _State:
    """What the proxy's threads share; they hold this, not the proxy, so that a proxy
    nobody refers to any more is collected and its port closed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.up = False
        self.generation = 0  # bumped by down(): a connection of an older one is cut
        self.open: set[socket.socket] = set()
        self.refused = 0


class TcpProxy:
    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self._state = _State(target)
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        self.port: int = server.getsockname()[1]
        self._server = server
        threading.Thread(target=_accept, args=(server, self._state), daemon=True).start()
        self._finalizer = weakref.finalize(self, _close, server, self._state)

    @property
    def refused(self) -> int:
        """How many connections it has cut at once, being down, so far."""
        with self._state.lock:
            return self._state.refused

    def up(self) -> None:
        with self._state.lock:
            self._state.up = True

    def down(self) -> None:
        """Refuse new connections and cut the ones in flight."""
        with self._state.lock:
            self._state.up = False
            self._state.generation += 1
            doomed, self._state.open = self._state.open, set()
        _cut(doomed)

    def close(self) -> None:
        """Down for good, and the port released."""
        self._finalizer()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(server: socket.socket, state: _State) -> None:
    # shutdown wakes the thread blocked in accept(); close alone would leave the port
    # listening until that accept returned
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)
    server.close()
    with state.lock:
        state.up = False
        state.generation += 1
        doomed, state.open = state.open, set()
    _cut(doomed)


def _cut(sockets: Iterable[socket.socket]) -> None:
    # all shut down before any is closed: shutdown wakes a thread blocked in recv() on
    # that socket, close alone does not (and sends nothing while that recv holds it)
    sockets = list(sockets)
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close sends a reset (the client fails at once) and leaves no TIME_WAIT
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _accept(server: socket.socket, state: _State) -> None:
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return  # closed
        with state.lock:
            up, generation = state.up, state.generation
            if not up:
                state.refused += 1
        if not up:
            _reset(client)
            continue
        try:
            upstream = socket.create_connection(state.target)
        except OSError:
            _reset(client)
            continue
        with state.lock:
            # taken down while this one was connecting upstream: it is cut like the others
            current = state.up and state.generation == generation
            if current:
                state.open.update((client, upstream))
        if not current:
            _cut({client, upstream})
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b, state), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket, state: _State) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with state.lock:
            state.open.difference_update((source, sink))
        _cut((source, sink))  # and the thread piping the other way wakes up
