"""SIGTERM and SIGHUP raised where a command is, as Python raises Ctrl-C's
KeyboardInterrupt there, so that its ``finally`` blocks run: the demo cancels its
campaign and stops its workers, a watching command restores the terminal (rich's
cursor) and says the campaign goes on."""

from __future__ import annotations

import signal
import threading


class Stopped(BaseException):  # noqa: N818 - a stop, not an error
    """SIGTERM (``timeout``, ``kill``, a CI job's end) or SIGHUP (a closed terminal). A
    BaseException, as KeyboardInterrupt is: no ``except Exception`` takes it for an
    error and goes on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While installed, SIGTERM and SIGHUP raise :class:`Stopped`. A signal already
    ignored stays ignored (``nohup``), and one whose handler Python did not install
    (None) is left alone, as it could not be put back; only the main thread, which
    alone receives signals, installs them."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                self.previous[sig] = signal.signal(sig, self._raise)

    @staticmethod
    def _raise(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    def ignore(self) -> None:
        """Ignore them from now on (a second TERM must not cut a cleanup short)."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
