"""DDP: 2 CPU processes (gloo) with batch 2 each train the same weights as 1 process with batch 4."""
import os
import socket

import torch
import torch.multiprocessing as mp

from occ_mfd.engine.checkpoint import load_checkpoint
from occ_mfd.engine.loop import train


def cfg_for(batch_size):
    # Two phases (so DDP must handle parameters unused in a phase), EMA, clipping; no input noise so the
    # loss is a deterministic function of the global batch.
    return dict(data=dict(type="occ_mfd.engine.toys.ToyRegressionDataset", n=24, dim=4),
                objective=dict(type="occ_mfd.engine.toys.ToyRegression", dim=4, two_phase=True, ratio=2),
                optim=dict(aux=dict(lr=1e-2, weight_decay=0.05, grad_clip=1.0), student=dict(lr=1e-2)),
                train=dict(max_steps=8, batch_size=batch_size, warmup_steps=2, ema_decay=0.9, log_interval=4,
                           ckpt_interval=8, tensorboard=False, seed=5))


def _worker(rank, world, port, work_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train(cfg_for(batch_size=2), work_dir, device="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    train(cfg_for(batch_size=4), tmp_path / "single", device="cpu")
    a, b = load_checkpoint(tmp_path / "ddp/latest.pt"), load_checkpoint(tmp_path / "single/latest.pt")
    assert a["world_size"] == 2 and len(a["rng"]) == 2 and b["world_size"] == 1
    for k, v in b["objective"].items():
        torch.testing.assert_close(a["objective"][k], v, rtol=0, atol=1e-6, msg=k)
    for k, v in b["ema"]["shadow"]["student"].items():
        torch.testing.assert_close(a["ema"]["shadow"]["student"][k], v, rtol=0, atol=1e-6, msg=k)
