"""A pool's worker process: ``python -m batchgen.job.pool_worker FD [--banner]``.

Invariant: it runs the finished config its pool (``batchgen.job.pool``) pickled on its stdin as
an ordinary worker (``run_worker``), converting nothing again; it reports its counts on the pipe
FD, prints its banner only when told and never its summary, and ends as the command line would
(its last word on stderr, the same exit status). When its pool goes away (its stdin closes
without the pool having stopped it) it stops as on SIGTERM: between batches, claims released.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable

from batchgen.errors import BatchgenError, Stopped
from batchgen.job.worker import Console, run_worker


def _report_to(fd: int) -> Callable[[dict], None]:
    """Counts (``Progress.counts``) as one JSON line each."""

    def report(counts: dict) -> None:
        line = json.dumps(counts) + "\n"
        # One short line, written whole; the pool gone, the stdin watch stops this worker.
        with contextlib.suppress(OSError):
            os.write(fd, line.encode())

    return report


def _watch_pool() -> None:
    """Stop this worker once its stdin closes: the pool that started it has ended."""
    # The raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader
    # aborts the interpreter's shutdown (it cannot take the reader's lock).
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    """Run one worker of a pool; exit as the command line does.

    Raises:
        SystemExit: 0 once every shard is published, 128 + N when signal N stopped it, 130
            on a second Ctrl-C, the error's status (2) after a ``batchgen: error:`` line.
    """
    args = sys.argv[1:] if argv is None else argv
    cfg = pickle.load(sys.stdin.buffer)
    started = time.perf_counter()
    threading.Thread(target=_watch_pool, name="batchgen-pool-watch", daemon=True).start()
    console = Console(banner="--banner" in args, summary=False, report=_report_to(int(args[0])))
    try:
        run_worker(cfg, started, console)
    except Stopped as e:
        print(f"batchgen: {e}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopped: no traceback from exit hooks
        sys.exit(e.exit_code)
    except BatchgenError as e:
        print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("batchgen: interrupted at once (a second Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
