"""The `orchard` command's entry point: loads the CLI where a Ctrl-C or SIGTERM
meanwhile ends it in one line, not a traceback, and once the command has said its
outcome, lets no signal turn its exit code into 130 or 143 while the interpreter shuts
down (a CI job retrying on 130 would submit again what was submitted): a signal then
ends the process at once, with the command's own code."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from scheduler.stopsignals import Stopped, StopSignals, exit_as_main, said_stop

#: The signals that, once the command has returned, end the process with its code.
AFTER_THE_COMMAND = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> int:
    signals = StopSignals()
    try:
        from scheduler.cli import main as command
    except (KeyboardInterrupt, Stopped) as exc:
        return said_stop(exc)
    finally:
        signals.restore()
    code = command()

    def exit_now(_signum: int, _frame: object) -> None:
        # what it had to say is said; a shutdown that hangs (a thread, a connection's
        # close) still ends at a signal
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        os._exit(code)

    for sig in AFTER_THE_COMMAND:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's stays
            signal.signal(sig, exit_now)
    return code


if __name__ == "__main__":
    exit_as_main(main())
