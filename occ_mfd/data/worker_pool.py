"""Worker processes with per-process state, for jobs whose workers need an expensive object (a devkit index).

``imap_unordered(task, items, init, workers)`` runs ``task(state, item)`` for every item in ``workers``
processes and yields the results as they finish. ``state = init()`` is built once per worker process, on its
first item (or handed in as ``inherit`` and shared copy-on-write under fork). Why not
``multiprocessing.Pool``: a Pool task reaches per-worker state only through a module global set by its
initializer; here the state is a local variable of the worker loop, gone with the process at the end of the
call and never visible to another call. Items are handed out one at a time over a pipe per worker (dynamic
balancing); a worker's exception is raised in the parent with its traceback chained (as Pool does); a worker
that dies is noticed (EOF on its pipe) instead of hanging the run.

Threads: OpenMP and BLAS size their thread pools when loaded, so ``OMP_NUM_THREADS=1`` (unless the user set
it) is in the environment of the workers before they start, and each worker resizes the pools it inherited
(under fork) with ``threadpoolctl``: parallelism is across items. The parent's environment is restored.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import connection
from multiprocessing.pool import RemoteTraceback
from typing import Any

from threadpoolctl import threadpool_limits

#: OpenMP reads it once, when it is loaded, to size its thread pool; a worker also takes it as the thread
#: count of every numeric library it has loaded.
THREAD_ENV = "OMP_NUM_THREADS"


@contextlib.contextmanager
def single_threaded_children():
    """``OMP_NUM_THREADS=1`` (unless already set) in the environment of processes started inside, and the
    parent's environment restored on exit."""
    old = os.environ.get(THREAD_ENV)
    if old is None:
        os.environ[THREAD_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(THREAD_ENV, None)


def _limit_threads() -> None:
    """In a worker (private to its process): resize the loaded libraries' thread pools to OMP_NUM_THREADS."""
    try:
        n = max(1, int(os.environ.get(THREAD_ENV, "1")))
    except ValueError:
        n = 1
    threadpool_limits(limits=n)


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(e).__name__}: {e}")


def _worker_main(conn, task: Callable, init: Callable, state: Any) -> None:
    """Receive an item (None: stop), answer ``("ok", result)`` or ``("error", (exception, traceback))``."""
    _limit_threads()
    while (item := conn.recv()) is not None:
        try:
            if state is None:
                state = init()          # once per worker process
            msg = ("ok", task(state, item))
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            msg = ("error", (_picklable(e), traceback.format_exc()))
        conn.send(msg)


def imap_unordered(task: Callable[[Any, Any], Any], items: Iterable, init: Callable[[], Any], workers: int,
                   inherit: Any = None, describe: Callable[[Any], str] = str) -> Iterator:
    """Yield ``task(state, item)`` for every item, in completion order (see the module docstring).

    ``task`` and ``init`` must be picklable (module-level functions or ``functools.partial`` of them) for the
    spawn start method. ``inherit``: a state the workers share under fork instead of calling ``init``.
    ``describe(item)`` names an item in the error raised when its worker dies. The workers are stopped
    (terminated, when the run did not finish) before this generator returns or is closed.
    """
    items = list(items)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    state = inherit if ctx.get_start_method() == "fork" else None   # spawn: each worker builds its own
    procs, busy, finished = [], {}, False
    todo = iter(items)

    def hand_out(p, conn):
        item = next(todo, None)
        conn.send(item)
        if item is not None:
            busy[conn] = (p, item)

    try:
        with single_threaded_children():
            for _ in range(min(workers, len(items))):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(there, task, init, state), daemon=True)
                p.start()
                there.close()           # drop our copy: the worker's end must reach EOF when it dies
                procs.append((p, here))
        for p, conn in procs:
            hand_out(p, conn)
        while busy:
            for conn in connection.wait(list(busy)):
                p, item = busy.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, ConnectionError):    # its end closed: the process is gone
                    p.join(5)
                    raise RuntimeError(f"the worker processing {describe(item)} died "
                                       f"(exit code {p.exitcode})") from None
                if status == "error":
                    exc, tb = value
                    raise exc from RemoteTraceback(tb)
                yield value
                hand_out(p, conn)
        finished = True
    finally:
        for p, conn in procs:
            if not finished and p.is_alive():
                p.terminate()
            conn.close()
        for p, _ in procs:
            p.join()
