"""Checkpoints: bit-exact resume, contents (weights_only), atomicity, finished runs, EMA reload."""
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from occ_mfd.builder import build
from occ_mfd.engine import checkpoint as ck
from occ_mfd.engine.toys import ToyRegression
from occ_mfd.engine.loop import train
from preempt_toys import assert_same_training_state

torch.set_num_threads(1)
GRID = dict(lo=[-40.0, -40.0, -1.0], hi=[40.0, 40.0, 5.4], voxel_size=0.8)


def cfg_for(max_steps=12, **obj):
    # two phases, input noise from the torch RNG, EMA, cosine + warm-up, 20 samples / batch 4 = 5 batches
    # per epoch, so the resume point (step 6) is mid-epoch.
    return dict(data=dict(type="occ_mfd.engine.toys.ToyRegressionDataset", n=20, dim=4),
                objective=dict(type="occ_mfd.engine.toys.ToyRegression", dim=4, noise=0.3, two_phase=True,
                               ratio=3, **obj),
                optim=dict(aux=dict(lr=1e-2, weight_decay=0.05, grad_clip=0.5), student=dict(lr=2e-2)),
                train=dict(max_steps=max_steps, batch_size=4, warmup_steps=3, ema_decay=0.99, log_interval=4,
                           ckpt_interval=3, keep_ckpts=2, tensorboard=False),
                grid=GRID)


def test_resume_is_bit_exact(tmp_path):
    train(cfg_for(), tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_for(crash_after=7), tmp_path / "split")           # dies during step 7, after ckpt 6
    assert ck.load_checkpoint(tmp_path / "split/latest.pt")["step"] == 6
    train(cfg_for(), tmp_path / "split")                            # the same command again: resumes
    a, b = (ck.load_checkpoint(tmp_path / d / "latest.pt") for d in ("full", "split"))
    assert a["step"] == 12
    assert_same_training_state(a, b)


def test_checkpoint_contents_and_pruning(tmp_path):
    train(cfg_for(max_steps=9), tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["ckpt_0000006.pt", "ckpt_0000009.pt", "latest.pt"]       # keep_ckpts=2
    assert os.path.samefile(tmp_path / "latest.pt", tmp_path / "ckpt_0000009.pt")
    raw = torch.load(tmp_path / "latest.pt", weights_only=True)               # plain data only
    assert raw["step"] == 9 and raw["format"] == ck.FORMAT
    assert raw["grid"] == GRID
    assert raw["torch_version"] == str(torch.__version__)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(ck.__file__).parent, capture_output=True, text=True)
    assert raw["git_rev"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    cfg = ck.load_config_from_checkpoint(raw)
    assert cfg.train.max_steps == 9 and cfg.objective.ratio == 3 and cfg.optim.aux.weight_decay == 0.05
    assert raw["loader"] == {"epoch": 1, "batch_in_epoch": 4, "batches_per_epoch": 5}


def test_finished_run_reports_and_returns(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="occ_mfd")
    train(cfg_for(max_steps=3), tmp_path)
    before = (tmp_path / "latest.pt").stat().st_mtime_ns
    res = train(cfg_for(max_steps=3), tmp_path)
    assert res.finished and res.step == 3
    assert "already finished" in caplog.text
    assert (tmp_path / "latest.pt").stat().st_mtime_ns == before


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    ck.save_checkpoint({"step": 1, "x": torch.ones(2)}, tmp_path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint({"step": 2, "x": torch.zeros(2)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.pt", "latest.pt"]
    assert torch.equal(ck.load_checkpoint(tmp_path / "latest.pt")["x"], torch.ones(2))


def test_build_objective_from_checkpoint_swaps_in_ema(tmp_path):
    train(cfg_for(max_steps=6), tmp_path)
    raw = ck.load_checkpoint(tmp_path / "latest.pt")
    live = ck.build_objective_from_checkpoint(tmp_path / "latest.pt", use_ema=False)
    ema = ck.build_objective_from_checkpoint(tmp_path / "latest.pt", use_ema=True)
    for k, v in live.state_dict().items():
        assert torch.equal(v, raw["objective"][k])
    for k, v in ema.net.state_dict().items():
        assert torch.equal(v, raw["ema"]["shadow"]["student"][k])
    assert not torch.equal(ema.net.lin.weight, live.net.lin.weight)
    assert torch.equal(ema.aux.lin.weight, live.aux.lin.weight)                # aux has no EMA


def test_config_text_writes_classes_as_dotted_strings():
    text = ck.config_text(Config(dict(objective=dict(type=ToyRegression, dim=3), t=dict(b=(0.9, 0.99)))))
    back = Config.fromstring(text, ".py")
    assert back.objective.type == "occ_mfd.engine.toys.ToyRegression" and tuple(back.t.b) == (0.9, 0.99)
    assert build(back.objective).net.lin.in_features == 3
