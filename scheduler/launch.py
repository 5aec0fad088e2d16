"""The `orchard` command's entry point: loads the CLI (SQLAlchemy, Celery, rich: a
second or so) where a Ctrl-C or SIGTERM meanwhile ends it in one line, not a
traceback, and once the command has said its outcome, lets no signal turn its exit
code into 130 or 143 while the interpreter shuts down (a CI job retrying on 130 would
submit again what was submitted)."""

from __future__ import annotations

import signal
import sys

from scheduler.stopsignals import Stopped, StopSignals

#: The signals ignored once the command has returned.
AFTER_THE_COMMAND = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> int:
    signals = StopSignals()
    try:
        from scheduler.cli import main as command
    except KeyboardInterrupt:
        print("orchard: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"orchard: stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        signals.restore()
    code = command()
    for sig in AFTER_THE_COMMAND:
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
