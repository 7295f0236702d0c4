"""Evaluation under torchrun: the batches are dealt to the ranks and the confusion matrices summed, so 2 gloo
processes give exactly the table of one process (same noise per batch, no padding duplicates), on every rank;
tools/eval.py under torchrun prints and writes once."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine import distributed as du
from occ_mfd.eval.baselines import CopyLast, WarpLast
from occ_mfd.eval.runner import run_eval, shard_batches
from test_eval_runner import G, Noisy, make_dataset

REPO = Path(__file__).resolve().parents[1]
# (batch_size, max_sequences): 7 sequences in 4 batches, the last one short; 1 batch only (rank 1 gets none).
CASES = [(2, None), (2, 2), (1, 5)]


def test_shards_partition_the_one_process_batches():
    one = shard_batches(7, 2)
    assert one == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5]), (3, [6])]
    for world in (2, 3, 8):
        shards = [shard_batches(7, 2, r, world) for r in range(world)]
        merged = sorted(b for s in shards for b in s)
        assert merged == one                                   # every batch once, unchanged, no padding
        assert all(b % world == r for r, s in enumerate(shards) for b, _ in s)
    with pytest.raises(ValueError):
        shard_batches(7, 2, rank=2, world_size=2)


def _rows():
    return [Noisy("noisy-a"), Noisy("noisy-b"), CopyLast(), WarpLast(G)]


def _evaluate(root, batch_size, max_sequences, dump_dir=None):
    ds = OccSequenceDataset(root, "val", mask="camera")
    res = run_eval(ds, _rows(), grid=G, batch_size=batch_size, seed=3, max_sequences=max_sequences,
                   dump_dir=dump_dir, dump_count=3, progress=False)
    return {(r.name, r.steps): (r.metrics.confusion, r.nfe) for r in res}


def _worker(rank, world, port, root, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = du.setup("cpu")
    try:
        results = [_evaluate(root, b, m, dump_dir=Path(out) / f"dump{i}") for i, (b, m) in enumerate(CASES)]
    finally:
        du.teardown(info)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("sharded"), static=False, n_frames=16)
    assert len(OccSequenceDataset(root, "val", mask="camera")) == 7
    return root


def test_two_gloo_ranks_give_the_one_process_table(data, tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    for i, (b, m) in enumerate(CASES):
        single = _evaluate(data, b, m, dump_dir=tmp_path / f"single{i}")
        for rank in (0, 1):
            sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)[i]
            assert sharded.keys() == single.keys()
            for key, (conf, nfe) in single.items():
                assert np.array_equal(sharded[key][0], conf), (i, rank, key)   # exact: counts, not floats
                assert sharded[key][1] == nfe
        # The noisy rows really depend on the per-batch noise, and the dumps are the same files.
        assert not np.array_equal(single[("noisy-a", 3)][0], single[("copy-last", 0)][0])
        dumps = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*.npz"))
        assert dumps(tmp_path / f"dump{i}") == dumps(tmp_path / f"single{i}") != []


def test_eval_cli_under_torchrun_matches_one_process(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [str(REPO / "tools/eval.py"), "--data", str(data), "--split", "val", "--mask", "camera",
              "--baseline", "copy-last", "--baseline", "warp-last", "--batch-size", "2", "--threads", "1"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one.json")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common, "--out", str(tmp_path / "two.json")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("== evaluation protocol ==") == 1 and two.stdout.count("wrote ") == 1
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["protocol"]["ranks"] == 2 and "ranks" not in a["protocol"]
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb
