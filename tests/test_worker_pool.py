"""occ_mfd.data.worker_pool: results, per-process state built once, errors and dead workers reported."""
import os

import pytest

from occ_mfd.data.worker_pool import THREAD_ENV, imap_unordered


def _init():
    return {"pid": os.getpid(), "inits": 1}


def _task(state, item):
    if item == "boom":
        raise KeyError("bad item boom")
    if item == "die":
        os._exit(3)
    return item * item, state["pid"], id(state), os.environ.get(THREAD_ENV)


def test_every_item_once_and_state_built_once_per_worker(monkeypatch):
    monkeypatch.delenv(THREAD_ENV, raising=False)
    out = list(imap_unordered(_task, range(12), _init, workers=2))
    assert sorted(r[0] for r in out) == [i * i for i in range(12)]
    pids = {r[1] for r in out}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    # one state object per worker process: as many distinct states as processes that did work
    assert len({(r[1], r[2]) for r in out}) == len(pids)
    assert {r[3] for r in out} == {"1"} and THREAD_ENV not in os.environ   # workers single-threaded, ours intact


def test_worker_exception_is_raised_in_the_caller():
    with pytest.raises(KeyError, match="bad item boom"):
        list(imap_unordered(_task, [1, 2, "boom", 3], _init, workers=2))


def test_dead_worker_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match=r"processing item-die died \(exit code 3\)"):
        list(imap_unordered(_task, [1, "die", 2], _init, workers=2, describe=lambda i: f"item-{i}"))
