"""SIGTERM and SIGHUP raised where a command is, as Python raises Ctrl-C's
KeyboardInterrupt there, so that its ``finally`` blocks run: the demo cancels its
campaign and stops its workers, a watching command restores the terminal (rich's
cursor) and says the campaign goes on."""

from __future__ import annotations

import signal
import sys
import threading
from typing import NoReturn


class Stopped(SystemExit):  # noqa: N818 - a stop, not an error
    """SIGTERM (``timeout``, ``kill``, a CI job's end) or SIGHUP (a closed terminal). A
    SystemExit (its code 128 + the signal's number, as a shell reports a process the
    signal ended), as Ctrl-C's KeyboardInterrupt is a BaseException: no ``except
    Exception`` takes it for an error and goes on, and psycopg cancels the query it
    stops on the server (it does for these two), whose locks would otherwise stay."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def said_stop(stop: KeyboardInterrupt | Stopped) -> int:
    """One line on stderr for a command stopped by Ctrl-C, SIGTERM or SIGHUP; the exit
    code a shell gives a process the signal ended (130, 143, 129)."""
    if isinstance(stop, Stopped):
        print(f"orchard: stopped by {stop}", file=sys.stderr)
        return 128 + stop.signum
    print("orchard: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def exit_as_main(code: int) -> NoReturn:
    """``sys.exit(code)`` for a module run by ``python -m``, which CPython would otherwise
    end by SIGINT (a status of -2, not 130 or the command's own) when a Ctrl-C that the
    command handled had been raised inside code evaluated from a string, such as a
    dataclass or a named tuple being made as a module loads: that sets a flag
    (``unhandled_keyboard_interrupt``) that ``python -m`` checks after the module
    returns, and each string evaluated resets it. A script (the ``orchard`` command)
    exits before that check."""
    exec("pass")  # noqa: S102 - a constant string: resets the flag, as said above
    sys.exit(code)


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

    #: Set once a signal was raised in this process: those after it are ignored, so that
    #: a second SIGTERM (`timeout`, a CI runner) does not cut the clean-ups short (a
    #: claim put back, a half-written folder removed) as the first one unwinds.
    stopping = False

    @classmethod
    def _raise(cls, signum: int, _frame: object) -> None:
        if StopSignals.stopping:
            return
        StopSignals.stopping = True
        raise Stopped(signum)

    def ignore(self) -> None:
        """Ignore them from now on (a second TERM must not cut a cleanup short)."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
