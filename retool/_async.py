"""One long-lived asyncio event loop in a daemon thread, shared by the rollout loop and the executors.

Lightning owns the main thread and calls ``training_step`` synchronously, while rollouts are asynchronous
(many trajectories wait on cells while others decode). Executors keep processes and connections between
steps, and those are bound to the loop that created them, so every step must run on the *same* loop: a
fresh ``asyncio.run`` per step would orphan them.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="retool-async", daemon=True)
            _thread.start()
        return _loop


def run_sync(
    coro: Coroutine[Any, Any, T],
    timeout: float | None = None,
    wait: Callable[[Future[T]], None] | None = None,
) -> T:
    """Run ``coro`` on the background loop and wait for its result from a synchronous caller.

    ``wait``, if given, is called with the coroutine's future and returns once it is done: the caller's
    thread works while it waits (a decode engine that must compute in this thread serves its requests).
    A ``KeyboardInterrupt`` (Ctrl-C) while waiting cancels the coroutine before it propagates, so that the
    coroutine's ``finally`` blocks (closing sessions, killing workers) still run.
    """
    loop = background_loop()
    if _running_in(loop):
        raise RuntimeError("run_sync was called from the background loop itself; await the coroutine instead")
    future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        if wait is not None:
            wait(future)
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@atexit.register
def _stop_loop() -> None:
    if _loop is not None and not _loop.is_closed():
        _loop.call_soon_threadsafe(_loop.stop)
