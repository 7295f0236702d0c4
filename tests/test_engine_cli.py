"""tools/train.py end to end (in-process): base defaults, --cfg-options, --max-steps, resume, exit codes."""
import importlib.util
import json
from pathlib import Path

import torch

from occ_mfd.engine.checkpoint import load_checkpoint, load_config_from_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _main():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "tools/train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_train_cli_defaults_overrides_and_resume(tmp_path, capsys):
    cfg = tmp_path / "toy.py"
    cfg.write_text(f'_base_ = ["{REPO / "configs/_base_/train_defaults.py"}"]\n'
                   'data = dict(type="occ_mfd.engine.toys.ToyRegressionDataset", n=16, dim=4)\n'
                   'objective = dict(type="occ_mfd.engine.toys.ToyRegression", dim=4)\n'
                   'train = dict(max_steps=100, batch_size=4, num_workers=0, amp=None, log_interval=2,\n'
                   '             ckpt_interval=2, tensorboard=False)\n')
    main, wd = _main(), tmp_path / "wd"
    assert main([str(cfg), "--work-dir", str(wd), "--max-steps", "4", "--device", "cpu",
                 "--cfg-options", "optim.main.lr=0.001", "train.warmup_steps=2"]) == 0
    c = load_checkpoint(wd / "latest.pt")
    got = load_config_from_checkpoint(c)
    assert c["step"] == 4 and got.train.max_steps == 4 and got.optim.main.lr == 0.001
    assert got.optim.main.weight_decay == 0.01 and got.train.ema_decay == 0.9999    # from _base_
    logs = [json.loads(line) for line in open(wd / "log.jsonl")]
    assert [r["step"] for r in logs] == [2, 4]
    # logged lr = mean over the interval: warm-up 1/2, 2/2; then cosine p = 0, 1/2 → 1, 0.2 + 0.8/2 = 0.6
    assert abs(logs[0]["lr"] - 0.75e-3) < 1e-12 and abs(logs[1]["lr"] - 0.8e-3) < 1e-12
    assert main([str(cfg), "--work-dir", str(wd), "--max-steps", "4"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main([str(cfg), "--work-dir", str(tmp_path / "nan"), "--max-steps", "9", "--cfg-options",
                 "objective.nonfinite_from=0", "train.max_nonfinite=3"]) == 1
    assert "3 consecutive non-finite" in capsys.readouterr().err
