"""Running an iterator a few items ahead in a background thread (the stream's row-group reads), with
errors handed to the consumer and every thread stopped at interpreter exit."""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Iterator

# Live prefetch threads, stopped at interpreter exit: a daemon thread killed inside a pyarrow read of a
# Hub file (C++ calling back into Python) aborts the process ("terminate called without an active exception").
_LIVE: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_prefetch_threads(timeout: float = 30.0) -> None:
    for stop in list(_LIVE.values()):
        stop.set()
    for thread in list(_LIVE):
        thread.join(timeout=timeout)


def prefetched(source: Iterator, depth: int) -> Iterator:
    """Run ``source`` in a background thread, ``depth`` items ahead; errors re-raise in the consumer.

    Closing this generator (explicitly, or by dropping it) stops and joins the thread; so does the
    interpreter's exit.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not put((True, item)):
                    break
        except BaseException as e:  # handed to the consumer
            put((False, e))
        finally:
            source.close()

    thread = threading.Thread(target=work, name="LatentStream-prefetch", daemon=True)
    _LIVE[thread] = stop
    thread.start()
    try:
        while True:
            try:
                ok, item = q.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("LatentStream prefetch thread ended without a result") from None
                continue
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
        _LIVE.pop(thread, None)
