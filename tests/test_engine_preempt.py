"""Interruptions cost minutes, not stages: stop signals, wall-clock checkpoints, unreadable checkpoints.

Every interrupted run is resumed and compared bit for bit (weights, EMA, optimiser state, RNG) with an
uninterrupted run whose checkpoints fall on other steps, so a save that perturbed training, or a resume from
the wrong place, fails. Signals come from the toy dataset (tests/preempt_toys.py) at a known step, or from
the test itself for tools/train.py.
"""
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from occ_mfd.engine import checkpoint as ck
from occ_mfd.engine.loop import train
from occ_mfd.engine.preempt import EXIT_PREEMPTED, REPEAT_WINDOW_S
from preempt_toys import CountingClock, assert_same_training_state, toy_cfg

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """12 steps in one go, one checkpoint at the end."""
    d = tmp_path_factory.mktemp("full")
    train(toy_cfg(), d)
    return ck.load_checkpoint(d / "latest.pt")


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT", "SIGINT")])
def test_signal_mid_stage_checkpoints_stops_and_resumes_bit_exactly(tmp_path, caplog, uninterrupted, signals):
    # The signal arrives while step 6 fetches its batch (item 24 = 6 × batch 4): step 6 completes, the run
    # saves at step 7 (mid-epoch: epoch 1, batch 2) and returns. The SIGINT case sends it twice at once, as a
    # terminal's Ctrl-C reaches torchrun and its workers alike: one request, not an immediate exit.
    caplog.set_level(logging.INFO, logger="occ_mfd")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        res = train(toy_cfg(data=dict(at_fetch=24, signals=signals)), tmp_path)
    except KeyboardInterrupt:
        pytest.fail("a repeated SIGINT within the repeat window interrupted training")
    assert (res.stopped_by, res.step, res.finished) == (signals[0], 7, False)
    assert res.checkpoint == tmp_path / "ckpt_0000007.pt"
    assert {s: signal.getsignal(s) for s in before} == before            # handlers restored
    assert ck.load_checkpoint(tmp_path / "latest.pt")["loader"] == {"epoch": 1, "batch_in_epoch": 2,
                                                                     "batches_per_epoch": 5}
    assert f"stopped by {signals[0]} at step 7/12; checkpoint: {tmp_path / 'ckpt_0000007.pt'}" in caplog.text
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == 7   # last steps logged
    res = train(toy_cfg(), tmp_path)                                      # the same command again
    assert res.finished and res.stopped_by is None
    assert_same_training_state(uninterrupted, ck.load_checkpoint(tmp_path / "latest.pt"))


def test_checkpoints_by_steps_or_wall_time_whichever_comes_first(tmp_path, caplog):
    # The loop reads the clock once before the first step, once per step and once after each save; this
    # clock advances 1 s per reading and ckpt_minutes is 3 s. Steps 3 and 7 are saved by time, 4 and 8 by
    # steps (ckpt_interval 4), 10 at the end; a step save restarts the wall-clock interval.
    caplog.set_level(logging.INFO, logger="occ_mfd")
    train(toy_cfg(max_steps=10, ckpt_interval=4, ckpt_minutes=0.05, keep_ckpts=0), tmp_path, clock=CountingClock())
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [ck.ckpt_name(s) for s in (3, 4, 7, 8, 10)]
    assert caplog.text.count("0.05 min since the last checkpoint") == 2


SIGKILL_SCRIPT = """
import sys
import threading
import time
from occ_mfd.engine.loop import train
from preempt_toys import CountingClock, toy_cfg
# 1 s per clock reading, a checkpoint every 3 s: saved by time at steps 3 and 6; SIGKILL while step 8
# fetches its batch (item 32), so steps 6 and 7 are lost.
train(toy_cfg(data=dict(at_fetch=32, signals=("SIGKILL",)), ckpt_minutes=0.05), sys.argv[1], clock=CountingClock())
"""


def test_sigkill_after_a_wall_clock_checkpoint_resumes_bit_exactly(tmp_path, uninterrupted):
    proc = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000006.pt"]
    assert ck.load_checkpoint(tmp_path / "latest.pt")["step"] == 6
    train(toy_cfg(), tmp_path)
    assert_same_training_state(uninterrupted, ck.load_checkpoint(tmp_path / "latest.pt"))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _slow_cfg_file(tmp_path: Path) -> tuple[dict, Path]:
    """A stage slow enough (5 ms per item, 40 steps) to be signalled from outside while it trains."""
    cfg = toy_cfg(max_steps=40, data=dict(delay_s=0.005), log_interval=1)
    cfg_file = tmp_path / "toy.py"
    cfg_file.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    return cfg, cfg_file


def test_tools_train_sigterm_from_outside_exits_143_and_resumes(tmp_path, capsys):
    # Signalled by the test once it has logged step 5, as SLURM would.
    cfg, cfg_file = _slow_cfg_file(tmp_path)
    args = [str(cfg_file), "--work-dir", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "tools/train.py", *args], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/40"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, out[-3000:]
    step = ck.load_checkpoint(tmp_path / "run/latest.pt")["step"]
    assert 5 <= step < 40, out[-3000:]
    assert f"stopped by SIGTERM at step {step}/40; checkpoint: {tmp_path / 'run' / ck.ckpt_name(step)}" in out
    capsys.readouterr()
    assert _tool("train").main(args) == 0                                 # the same command again
    assert f"resumed from {tmp_path / 'run' / 'latest.pt'} at step {step}/40" in capsys.readouterr().out
    train(cfg, tmp_path / "full")
    assert_same_training_state(*(ck.load_checkpoint(tmp_path / d / "latest.pt") for d in ("full", "run")))


def test_demo_passes_ctrl_c_on_to_a_training_stage_once(tmp_path, monkeypatch):
    # Ctrl-C reaches the demo (here: SIGINT to this process once the stage has logged a step); the demo
    # forwards it once, so the stage writes its checkpoint and exits 143 instead of being SIGKILLed.
    _, cfg_file = _slow_cfg_file(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    log = tmp_path / "run" / "log.jsonl"

    def press_ctrl_c():
        deadline = time.monotonic() + 60
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    rc, interrupted = _tool("demo")._run_forwarding_signals(
        [sys.executable, "tools/train.py", str(cfg_file), "--work-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert (rc, interrupted) == (EXIT_PREEMPTED, True)
    assert signal.getsignal(signal.SIGINT) is before
    assert 1 <= ck.load_checkpoint(tmp_path / "run/latest.pt")["step"] < 40


SECOND_SIGNAL_SCRIPT = """
import sys
import threading
import time
from occ_mfd.engine.loop import train
from preempt_toys import toy_cfg
train(toy_cfg(data=dict(at_fetch=8, signals=("SIGTERM", "SIGTERM"), gap_s=float(sys.argv[2]))), sys.argv[1])
print("returned")
"""


def test_second_signal_exits_at_once_without_a_checkpoint(tmp_path):
    # The second SIGTERM comes after the repeat window, still during step 2: killed by it, nothing saved.
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_SCRIPT, str(tmp_path), str(REPEAT_WINDOW_S + 0.3)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "returned" not in proc.stdout and not list(tmp_path.glob("*.pt"))


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()                    # latest.pt is a hard link: write a new file, as a copy from elsewhere is
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_unreadable_latest_falls_back_to_the_previous_kept_checkpoint(tmp_path, caplog, uninterrupted, how):
    caplog.set_level(logging.INFO, logger="occ_mfd")
    train(toy_cfg(ckpt_interval=3, data=dict(at_fetch=20)), tmp_path)      # stopped at 6: ckpt 3, 6, latest → 6
    _corrupt(tmp_path / "latest.pt", how)
    train(toy_cfg(ckpt_interval=3), tmp_path)
    assert f"cannot resume from {tmp_path / 'latest.pt'}" in caplog.text
    assert f"resuming from {tmp_path / 'ckpt_0000006.pt'} instead (step 6)" in caplog.text
    assert_same_training_state(uninterrupted, ck.load_checkpoint(tmp_path / "latest.pt"))


def test_unreadable_checkpoints_fall_back_further_or_refuse(tmp_path, caplog, uninterrupted):
    caplog.set_level(logging.INFO, logger="occ_mfd")
    train(toy_cfg(ckpt_interval=3, data=dict(at_fetch=20)), tmp_path)
    with open(tmp_path / "ckpt_0000006.pt", "r+b") as f:                  # truncates latest.pt too (hard link)
        f.truncate(100)
    train(toy_cfg(ckpt_interval=3), tmp_path)
    assert f"resuming from {tmp_path / 'ckpt_0000003.pt'} instead (step 3)" in caplog.text
    assert_same_training_state(uninterrupted, ck.load_checkpoint(tmp_path / "latest.pt"))

    for p in tmp_path.glob("*.pt"):                                       # nothing readable left
        _corrupt(p, "truncated")
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")}
    with pytest.raises(ck.CheckpointUnreadable, match="refusing to start again from step 0") as e:
        train(toy_cfg(max_steps=20, ckpt_interval=3), tmp_path)
    assert str(tmp_path / "latest.pt") in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")} == files   # nothing overwritten


# ------------------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank, world, port, work_dir, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    res = train(cfg, work_dir, device="cpu")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step": res.step, "stopped_by": res.stopped_by}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_cfg(batch_size, **data):
    # 24 samples, 2 ranks × batch 2: 6 batches per epoch; no input noise, so 2 ranks × 2 = 1 process × 4.
    cfg = toy_cfg(max_steps=8, data=dict(n=24, **data), batch_size=batch_size, warmup_steps=2, ema_decay=0.9,
                  seed=5)
    cfg["objective"]["noise"] = 0.0
    return cfg


def test_ddp_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    torch.set_num_threads(1)
    run, out = tmp_path / "ddp", tmp_path / "out"
    out.mkdir()
    # Only rank 1 is signalled, while step 3 fetches its batch (item 6 = 3 × batch 2): both ranks finish
    # step 3, save step 4 together and return.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(run), ddp_cfg(2, at_fetch=6, rank=1), str(out)), nprocs=2,
             join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [{"step": 4, "stopped_by": "SIGTERM"}] * 2
    # What they saved is the state of step 4: the same as one process with batch 4 stopped there (by a
    # signal while step 3 fetches item 12 = 3 × 4); tests/test_engine_ddp.py: 2 × 2 matches 1 × 4 to 1e-6.
    res = train(ddp_cfg(4, at_fetch=12), tmp_path / "single", device="cpu")
    assert (res.step, res.stopped_by) == (4, "SIGTERM")
    a, b = ck.load_checkpoint(run / "latest.pt"), ck.load_checkpoint(tmp_path / "single/latest.pt")
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2
    for k, v in b["objective"].items():
        torch.testing.assert_close(a["objective"][k], v, rtol=0, atol=1e-6, msg=k)
    for k, v in b["ema"]["shadow"]["student"].items():
        torch.testing.assert_close(a["ema"]["shadow"]["student"][k], v, rtol=0, atol=1e-6, msg=k)


def test_loader_workers_ignore_stop_signals():
    """The trainer decides when to stop: its DataLoader workers must survive the group-wide SIGTERM / SIGINT."""
    import signal

    from occ_mfd.engine.data_loader import StepLoader, ignore_stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    loader = StepLoader(list(range(8)), 2, rank=0, world_size=1, seed=0, num_workers=1)
    assert loader.loader.worker_init_fn is ignore_stop_signals
    assert StepLoader(list(range(8)), 2, rank=0, world_size=1, seed=0).loader.worker_init_fn is None
