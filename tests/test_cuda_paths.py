"""The CUDA-only code paths, checked on any machine: the NCCL set-up order, CUDA RNG in checkpoints, pinned
dataclass batches and the one-line error for a missing GPU. Where CUDA is absent, torch's CUDA entry points
are replaced by recorders (the logic is ours; the real calls run in the ``gpu`` tests at the end)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory

from occ_mfd.data.records import OccBatch, OccSequence, collate_sequences
from occ_mfd.engine import checkpoint as ck
from occ_mfd.engine import distributed as du
from occ_mfd.grid import GridSpec

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- fake CUDA

@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports a CUDA build with 2 GPUs; set_device / init_process_group / RNG calls are recorded."""
    calls = []
    rng = {0: torch.tensor([1, 2, 3], dtype=torch.uint8), 1: torch.tensor([4, 5, 6], dtype=torch.uint8)}
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [rng[0].clone(), rng[1].clone()])

    def set_all(states):
        calls.append(("set_rng_state_all", [s.clone() for s in states]))

    def set_one(state, device="cuda"):
        calls.append(("set_rng_state", state.clone(), device))

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    return calls, rng


def _torchrun_env(monkeypatch, rank, world):
    for k, v in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29999").items():
        monkeypatch.setenv(k, str(v))


def test_nccl_setup_sets_the_device_before_init_and_passes_device_id(fake_cuda, monkeypatch):
    calls, _ = fake_cuda
    _torchrun_env(monkeypatch, rank=1, world=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = du.setup("cuda")
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init", {"backend": "nccl", "init_method": "env://", "device_id": torch.device("cuda", 1)})]
    assert (info.rank, info.world_size, info.local_rank, info.owns_group) == (1, 2, 1, True)
    assert info.device == torch.device("cuda", 1)


def test_single_process_cuda_sets_the_device_and_creates_no_group(fake_cuda, monkeypatch):
    calls, _ = fake_cuda
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    info = du.setup("cuda:1")                                  # an explicit index is kept
    assert calls == [("set_device", torch.device("cuda", 1))]
    assert info == du.DistInfo(device=torch.device("cuda", 1))


def test_gloo_setup_on_cpu_passes_no_device(monkeypatch):
    calls = []
    _torchrun_env(monkeypatch, rank=0, world=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    info = du.setup("cpu")
    assert calls == [{"backend": "gloo", "init_method": "env://"}] and info.device == torch.device("cpu")


def test_nccl_barrier_names_this_ranks_gpu(monkeypatch):
    seen = []
    monkeypatch.setattr(du, "is_active", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "barrier", lambda **kw: seen.append(kw))
    du.barrier()
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    du.barrier()
    assert seen == [{"device_ids": [3]}, {}]


@pytest.mark.parametrize("version,available,count,device,match", [
    (None, False, 0, "cuda", r"CPU-only build; install a CUDA build of torch .* or use --device cpu"),
    ("12.4", False, 0, "cuda", r"sees no GPU.*nvidia-smi"),
    ("12.4", True, 1, "cuda:1", r"only 1 CUDA device\(s\) visible \(cuda:0..cuda:0\)"),
])
def test_check_device_says_what_is_missing(monkeypatch, version, available, count, device, match):
    monkeypatch.setattr(torch.version, "cuda", version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(du.DeviceUnavailable, match=match) as e:
        du.check_device(device)
    assert "\n" not in str(e.value)
    assert du.check_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------ CUDA RNG

def _roundtrip(state, tmp_path):
    ck.atomic_save({"rng": [state]}, tmp_path / "rng.pt")
    return torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0]


def test_cuda_rng_of_every_device_is_saved_and_restored(fake_cuda, tmp_path):
    calls, rng = fake_cuda
    state = _roundtrip(ck.get_rng_state(), tmp_path)          # weights_only=True loads it
    assert [s.tolist() for s in state["cuda"]] == [rng[0].tolist(), rng[1].tolist()]
    assert ck.set_rng_state(state) is None
    (name, restored), = calls
    assert name == "set_rng_state_all" and [s.tolist() for s in restored] == [[1, 2, 3], [4, 5, 6]]


def test_cuda_rng_restore_with_fewer_devices_and_old_single_state(fake_cuda, monkeypatch):
    calls, _ = fake_cuda
    state = ck.get_rng_state()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    note = ck.set_rng_state(state)
    assert "2 device(s), 1 visible: restored 1" in note
    assert len(calls) == 1 and calls[0][0] == "set_rng_state" and calls[0][1].tolist() == [1, 2, 3]
    assert calls[0][2] == 0
    calls.clear()
    old = dict(state, cuda=torch.tensor([9, 9], dtype=torch.uint8))   # earlier checkpoints: one tensor
    assert ck.set_rng_state(old) is None
    assert calls[0][0] == "set_rng_state" and calls[0][1].tolist() == [9, 9]


def test_cpu_rng_roundtrip_and_notes_across_machines(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = _roundtrip(ck.get_rng_state(), tmp_path)
    assert "cuda" not in state
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert ck.set_rng_state(state) is None
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with_cuda = dict(state, cuda=[torch.zeros(2, dtype=torch.uint8)])
    assert "CUDA is not available here" in ck.set_rng_state(with_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "saved without CUDA" in ck.set_rng_state(state)


# ------------------------------------------------------------------------------------ pinned batches

G = GridSpec((-1.0, -1.0, -0.4), (1.0, 1.0, 0.4), 0.4)


def _batch(with_optional: bool) -> OccBatch:
    rng = np.random.default_rng(0)
    items = [OccSequence(past=rng.integers(0, 18, (2, 5, 5, 2), dtype=np.uint8),
                         future=rng.integers(0, 18, (3, 5, 5, 2), dtype=np.uint8),
                         ego=np.tile(np.eye(4, dtype=np.float32), (5, 1, 1)),
                         mask_future=rng.random((3, 5, 5, 2)) < 0.5 if with_optional else None,
                         scene=f"s{i}", tokens=[f"t{k}" for k in range(5)], grid=G,
                         lidar_traj=rng.random((5, 2)).astype(np.float32) if with_optional else None)
             for i in range(2)]
    return collate_sequences(items)


@pytest.mark.parametrize("with_optional", [True, False])
def test_occbatch_pin_memory_pins_every_tensor_field_and_keeps_the_rest(monkeypatch, with_optional):
    """DataLoader(pin_memory=True) calls ``batch.pin_memory()``; every tensor field (incl. lidar_traj) must be
    replaced by its pinned copy, metadata kept. Tensor.pin_memory is a recorder here (needs CUDA for real)."""
    pinned = []

    def fake_pin(self, *args, **kwargs):
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    b = _batch(with_optional)
    p = dataloader_pin_memory(b)                              # what the DataLoader's pin thread runs
    assert type(p) is OccBatch
    tensors = ["past", "future", "ego"] + (["mask_future", "lidar_traj"] if with_optional else [])
    assert len(pinned) == len(tensors)
    for name in tensors:
        assert any(getattr(p, name) is t for t in pinned), name
        assert torch.equal(getattr(p, name), getattr(b, name))
    if not with_optional:
        assert p.mask_future is None and p.lidar_traj is None
    assert p.scenes == b.scenes and p.tokens == b.tokens and p.grid == b.grid


# --------------------------------------------------------------------------------- --device cuda, no GPU

@pytest.mark.skipif(HAS_CUDA, reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("tool,args", [
    ("train.py", ["configs/tiny/vae.py", "--work-dir", "{tmp}/w"]),
    ("eval.py", ["--data", "{tmp}", "--baseline", "copy-last"]),
    ("bench.py", ["--teacher", "{tmp}/none.pt"]),
    ("gpu_check.py", ["--out", "{tmp}/g.json"]),
])
def test_tools_say_in_one_line_that_there_is_no_cuda(tmp_path, tool, args):
    args = [a.format(tmp=tmp_path) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args, "--device", "cuda"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --device cuda"), r.stderr
    assert "use --device cpu" in err[0]


# ------------------------------------------------------------------------------------------ real CUDA

@pytest.mark.gpu
def test_gpu_pin_memory_and_rng_roundtrip(tmp_path):
    b = _batch(True)
    p = b.pin_memory()
    assert all(getattr(p, n).is_pinned() for n in ("past", "future", "ego", "mask_future", "lidar_traj"))
    torch.cuda.manual_seed_all(3)
    state = _roundtrip(ck.get_rng_state(), tmp_path)
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(4, device="cuda")
    assert ck.set_rng_state(state) is None
    assert torch.equal(a, torch.rand(4, device="cuda"))
