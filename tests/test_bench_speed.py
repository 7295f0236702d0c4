"""Speed protocol: stage/end-to-end times against a fake clock, call counts, device syncs, ratio arithmetic, the
timed stages compute what the pipeline computes, and tools/bench.py end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.eval.speed import SpeedRow, measure, pipeline_stages, speedups, time_stages
from occ_mfd.models.pipeline import OccForecastPipeline

REPO = Path(__file__).resolve().parents[1]
SLEEPS_MS = {"encode": 4.0, "sample": 12.0, "decode": 6.0, "argmax": 2.0}


class FakeClock:
    """A clock that advances only when a stage 'works': stage ``name`` takes exactly SLEEPS_MS[name]."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def work(self, ms: float) -> None:
        self.now += ms / 1e3


def fake_stages(calls, clock):
    def stage(name):
        def fn(x):
            calls[name] = calls.get(name, 0) + 1
            clock.work(SLEEPS_MS[name] * (1 + (calls[name] % 5 == 0)))   # every 5th call is twice as slow
            return x + 1
        return name, fn
    return [stage(n) for n in SLEEPS_MS]


def test_stage_times_against_a_fake_clock_and_warmup_is_untimed():
    calls, clock, synced = {}, FakeClock(), []
    e2e, per = time_stages(fake_stages(calls, clock), 0, runs=15, warmup=3, clock=clock,
                           sync=lambda device: synced.append(device))
    assert calls == {n: 18 for n in SLEEPS_MS}                 # warm-up runs execute, but are not recorded
    assert len(synced) == 18 * (1 + len(SLEEPS_MS))            # once before the chain, once after every stage
    assert e2e.shape == (15,) and all(v.shape == (15,) for v in per.values())
    for name, ms in SLEEPS_MS.items():
        # calls 4..18 are timed; calls 5, 10, 15 take 2 ms-units: exactly 3 slow runs of 15
        expected = np.array([ms * (1 + (c % 5 == 0)) for c in range(4, 19)])
        np.testing.assert_allclose(per[name], expected, atol=1e-6)
    np.testing.assert_allclose(e2e, sum(per.values()), atol=1e-6)  # end to end is the whole chain


def test_next_inputs_feed_every_run_outside_the_timed_chain():
    """Streaming rows: run i's input comes from next_inputs(i), and the time it takes (a full encode when a drive
    starts over) is not in any stage or the end-to-end time."""
    calls, clock, fed, seen = {}, FakeClock(), [], []

    def next_inputs(i):
        fed.append(i)
        clock.work(1000.0)                                       # a slow untimed prime
        return 10 * i

    stages = [("seen", lambda x: seen.append(x) or x)] + fake_stages(calls, clock)
    e2e, per = time_stages(stages, None, runs=6, warmup=2, clock=clock, sync=lambda d: None, next_inputs=next_inputs)
    assert fed == list(range(-2, 6))                           # once per run, warm-up included, in order
    assert seen == [10 * i for i in range(-2, 6)]              # each run starts from its own input
    np.testing.assert_allclose(per["seen"], 0.0, atol=1e-6)
    np.testing.assert_allclose(e2e, sum(per.values()), atol=1e-6)
    assert e2e.max() < 100.0                                   # the 1000 ms feeder is outside the chain


def test_streaming_marker_is_on_streaming_rows_only():
    plain = SpeedRow("student@1", 1, 1, 5.0, 6.0, 200.0, {"encode": 1.0}, options=["bf16-autocast"])
    stream = SpeedRow("student@1+streaming", 1, 1, 4.0, 5.0, 250.0, {"encode": 0.2}, options=["streaming"])
    assert "streaming" not in plain.to_dict()
    assert stream.to_dict()["streaming"] is True and stream.to_dict()["options"] == ["streaming"]
    assert set(stream.to_dict()) == set(plain.to_dict()) | {"streaming"}


def test_cuda_sync_is_called_on_cuda_devices_only(monkeypatch):
    from occ_mfd.eval import speed

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(torch.device(device)))
    speed.synchronize("cpu")
    assert seen == []
    speed.synchronize("cuda:1")
    assert seen == [torch.device("cuda:1")]


def test_measure_fields_and_speedup_arithmetic():
    clock = FakeClock()
    row = measure("fake@4", 4, 4, fake_stages({}, clock), 0, runs=10, warmup=0, progress=False, clock=clock)
    # calls 1..10, 5 and 10 are slow: median of eight 24 ms runs and two 48 ms runs = 24; p90 = 24 + 0.9·24
    assert row.latency_ms_median == pytest.approx(24.0) and row.fps == pytest.approx(1e3 / 24.0)
    assert row.latency_ms_p90 == pytest.approx(np.percentile([24.0] * 8 + [48.0] * 2, 90))
    assert row.stages_ms == pytest.approx(SLEEPS_MS)
    mk = lambda name, ms: SpeedRow(name, 1, 1, ms, ms, 1e3 / ms, {})
    rows = [mk("teacher@10", 40.0), mk("student@1", 8.0), mk("teacher@1", 10.0)]
    assert speedups(rows, "teacher@10") == {"teacher@10": 1.0, "student@1": 5.0, "teacher@1": 4.0}
    with pytest.raises(ValueError, match="no row named"):
        speedups(rows, "teacher@20")


def _tiny_pipeline(fused=True):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_cli import tiny_teacher

    obj = tiny_teacher(steps=3, shift=3.0, cfg_scale=2.0)
    return OccForecastPipeline(obj.codec, obj.net, obj.sampler, fused_cfg=fused).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_timed_stages_compute_the_pipeline_forecast(fused):
    from occ_mfd.data.records import OccBatch

    pipe = _tiny_pipeline(fused)
    g = torch.Generator().manual_seed(1)
    occ = torch.where(torch.rand(1, 10, 10, 10, 2, generator=g) < 0.6, 17, torch.randint(0, 17, (1, 10, 10, 10, 2),
                                                                                      generator=g))
    ego = torch.eye(4).repeat(1, 10, 1, 1)
    ego[0, :, 0, 3] = torch.arange(10.0) - 3
    batch = OccBatch(past=occ[:, :4], future=occ[:, 4:], ego=ego)
    x = batch
    for _, fn in pipeline_stages(pipe, 3, seed=5):
        x = fn(x)
    ref = pipe.forecast(batch, steps=3, generator=torch.Generator().manual_seed(5))
    assert x.dtype == torch.uint8 and torch.equal(x, ref.classes)
    lat = pipeline_stages(pipe, 3, seed=5)
    y, cond = lat[1][1](lat[0][1](batch))                     # sample hands on (latents, their condition)
    assert torch.equal(y, ref.latents) and torch.equal(cond.past_latents, pipe.encode(batch).past_latents)                         # the very computation eval runs
    fused_ref = _tiny_pipeline(True).forecast(batch, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(y, fused_ref.latents, atol=1e-5)     # two-pass CFG = fused CFG numerically
    other = pipe.forecast(batch, steps=3, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other.latents, ref.latents)     # the seed reaches the noise


def test_bench_cli_json(stages, tmp_path):
    """tools/bench.py on the trained tiny stages: rows, NFE, ratios and the training-step timings."""
    tmp, data = stages
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--teacher", tmp / "teacher",
                        "--student", tmp / "mfd/snapshot.pt", "--data", data, "--steps", "1", "2", "--runs", "3",
                        "--warmup", "1", "--train-runs", "1", "--train-warmup", "0", "--threads", "1", "--out", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "below the protocol" in r.stderr
    d = json.loads(out.read_text())
    assert d["device"]["device"] == "cpu" and d["device"]["threads"] == 1 and d["device"]["dtype"] == "float32"
    assert [(row["name"], row["nfe"]) for row in d["rows"]] == [("teacher@1", 1), ("teacher@2", 2),
                                                               ("student@1", 1), ("floor", 1),
                                                               ("student@1+streaming", 1)]
    assert [row.get("streaming", False) for row in d["rows"]] == [False] * 4 + [True]   # the student only
    assert d["protocol"]["teacher_cfg_scale"] == 2.0 and d["protocol"]["teacher_net_evals_per_step"] == 2
    for row in d["rows"]:
        stages_sum = sum(row["stages_ms"].values())
        assert row["latency_ms_median"] <= stages_sum * 1.5 + 1.0   # e2e is the chain (medians need not add up)
    assert set(d["rows"][0]["stages_ms"]) == {"encode", "sample", "decode", "argmax"}
    assert set(d["rows"][3]["stages_ms"]) == {"prepared", "sample", "decode", "argmax"}
    # the tiny teacher has no ego-motion prior: the streaming rows' encode is the new frame + the cached history
    assert set(d["rows"][4]["stages_ms"]) == {"encode", "sample", "decode", "argmax"}
    stream = d["streaming"]
    assert stream["inputs"].startswith("2 consecutive windows of scene scene-b")   # the val scene: 11 frames
    for name in ("student@1+streaming",):
        # every run (1 warm-up + 3 timed) continued the previous one; the primes before them were untimed
        assert stream["rows"][name]["runs_continuing"] == stream["rows"][name]["runs"] == 4
        assert stream["rows"][name]["full_encodes_untimed"] == 4      # 2 windows: re-primed before every run
        assert stream["rows"][name]["prior_frames_encoded_per_run"] == 0
    assert d["student_streaming_over_floor"] == pytest.approx(d["rows"][4]["latency_ms_median"] /
                                                              d["rows"][3]["latency_ms_median"])
    assert d["student_streaming_over_student"] == pytest.approx(d["rows"][4]["latency_ms_median"] /
                                                                d["rows"][2]["latency_ms_median"])
    assert d["speedup_reference"] == "teacher@2" and d["speedups"]["teacher@2"] == 1.0
    assert d["speedups"]["teacher@1"] == pytest.approx(d["rows"][1]["latency_ms_median"] /
                                                       d["rows"][0]["latency_ms_median"])
    assert d["student_over_floor"] == pytest.approx(d["rows"][2]["latency_ms_median"] /
                                                    d["rows"][3]["latency_ms_median"])
    steps = d["training_steps_ms"]
    assert set(steps) == {"batch_size", "teacher_fm", "mfd_aux", "mfd_student"}
    # an MFD student step: student forward + teacher (CFG: 2 per sub-step) and aux sub-steps over [s, t] ≤ 1
    # with h = 0.25: at most 4 sub-steps each, at least 1
    assert 1 + 2 + 1 <= steps["mfd_student"]["nfe_median"] <= 1 + 2 * 4 + 4
