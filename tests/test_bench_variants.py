"""tools/bench.py's --bf16 / --channels-last / --compile rows on CPU: each row records its dtype (bf16 rows say
bfloat16), each variant computes what the plain pipeline computes, and the bf16 rows really run in bf16. The
streaming rows of a teacher with an ego-motion prior time the prior as a stage of its own."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from occ_mfd.builder import build
from occ_mfd.data.records import OccBatch
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.eval.speed import pipeline_stages
from occ_mfd.models.snapshot import InferenceParts, snapshot_from_parts
from occ_mfd.objectives.flow_matching import OccFlowTeacher
from test_eval_cli import NET, VAE, save_tiny_snapshot, save_tiny_student
from test_eval_runner import make_dataset

REPO = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("occ_mfd_tools_bench", REPO / "tools" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return save_tiny_snapshot(tmp / "teacher"), save_tiny_student(tmp / "student")


def _batch():
    g = torch.Generator().manual_seed(1)
    occ = torch.where(torch.rand(1, 10, 10, 10, 2, generator=g) < 0.6, 17,
                      torch.randint(0, 17, (1, 10, 10, 10, 2), generator=g))
    ego = torch.eye(4).repeat(1, 10, 1, 1)
    ego[0, :, 0, 3] = torch.arange(10.0) - 3
    return OccBatch(past=occ[:, :4], future=occ[:, 4:], ego=ego)


def _run_chain(stages, batch):
    x = batch
    outs = {}
    with torch.inference_mode():
        for name, fn in stages:
            x = fn(x)
            outs[name] = x[0] if name == "sample" else x     # sample hands on (latents, condition): keep the latents
    return outs


def test_bench_bf16_and_channels_last_rows_record_their_dtype(snaps, tmp_path, capsys):
    teacher, student = snaps
    out = tmp_path / "bench.json"
    rc = _bench_module().main(["--teacher", str(teacher), "--student", str(student), "--steps", "1", "2",
                               "--runs", "2", "--warmup", "1", "--bf16", "--channels-last", "--no-train",
                               "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--bf16 on CPU" in err and "no streaming rows (no --data" in err   # a synthetic window is no drive
    d = json.loads(out.read_text())
    dtypes = {r["name"]: r["dtype"] for r in d["rows"]}
    assert dtypes == {"teacher@1": "float32", "teacher@2": "float32", "student@1": "float32", "floor": "float32",
                      "teacher@2+channels-last": "float32", "student@1+channels-last": "float32",
                      "teacher@2+bf16": "bfloat16", "student@1+bf16": "bfloat16"}
    opts = {r["name"]: r["options"] for r in d["rows"]}
    assert opts["teacher@2+bf16"] == ["bf16-autocast"] and opts["student@1+channels-last"] == ["channels-last"]
    assert d["device"]["dtype"] == "float32 (rows +bf16: bfloat16 autocast)"


def test_bf16_stages_compute_in_bf16_and_channels_last_is_the_same_function(snaps):
    pipe, _ = load_forecaster(snaps[0], device="cpu")
    batch = _batch()
    ref = _run_chain(pipeline_stages(pipe, 2, seed=3), batch)
    bf = _run_chain(pipeline_stages(pipe, 2, seed=3, autocast=torch.bfloat16), batch)
    assert ref["decode"].dtype == torch.float32 and bf["decode"].dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: the same forecast up to rounding, not bit-identical.
    assert not torch.equal(bf["sample"].float(), ref["sample"])
    rel = (bf["sample"].float() - ref["sample"]).norm() / ref["sample"].norm()
    assert 0 < rel < 0.05, rel
    cl = _bench_module().variant(pipe, "channels-last", "cpu")
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in cl.net.parameters())
    out = _run_chain(pipeline_stages(cl, 2, seed=3), batch)
    assert torch.allclose(out["sample"], ref["sample"], atol=1e-4)
    assert torch.equal(out["argmax"], ref["argmax"])


@pytest.mark.slow
def test_compiled_variant_matches_eager(snaps):
    """torch.compile (inductor, CPU): same latents as eager. Skipped when compiling takes over 60 s here."""
    pipe, _ = load_forecaster(snaps[0], device="cpu")
    batch = _batch()
    ref = _run_chain(pipeline_stages(pipe, 1, seed=3), batch)
    comp = _bench_module().variant(pipe, "compile", "cpu")
    t0 = time.perf_counter()
    try:
        out = _run_chain(pipeline_stages(comp, 1, seed=3), batch)
    except Exception as e:  # no C++ toolchain for inductor, etc.
        pytest.skip(f"torch.compile unavailable on this machine: {type(e).__name__}: {str(e)[:200]}")
    took = time.perf_counter() - t0
    if took > 60:
        pytest.skip(f"compile took {took:.0f} s (> 60 s) on this machine")
    assert torch.allclose(out["sample"], ref["sample"], atol=1e-4)
    assert torch.equal(out["argmax"], ref["argmax"])


def test_streaming_rows_of_a_prior_teacher_time_the_prior_apart(tmp_path, capsys):
    """A cv-warp teacher: the streaming row encodes 1 history frame per run, and the prior's warp + encode of the
    F future frames is its own stage (the one-shot rows' encode holds both). --no-streaming drops the row."""
    torch.manual_seed(0)
    vae = snapshot_from_parts(InferenceParts("vae", {"vae": build(VAE)})).describe()
    teacher = save_tiny_snapshot(tmp_path / "teacher", objective=OccFlowTeacher(
        net=dict(NET, prior="cv-warp"), vae=vae, latent_scale=1.0, cond_drop_prob=0.1))
    data = make_dataset(tmp_path / "data", static=False, n_frames=12)           # one val scene: 3 windows
    out = tmp_path / "bench.json"
    args = ["--teacher", str(teacher), "--data", str(data), "--steps", "1", "--runs", "3", "--warmup", "1",
            "--no-train", "--out", str(out)]
    assert _bench_module().main(args) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert [r["name"] for r in d["rows"]] == ["teacher@1", "floor", "teacher@1+streaming"]
    rows = {r["name"]: r for r in d["rows"]}
    assert set(rows["teacher@1"]["stages_ms"]) == {"encode", "sample", "decode", "argmax"}
    assert set(rows["teacher@1+streaming"]["stages_ms"]) == {"encode", "prior", "sample", "decode", "argmax"}
    info = d["streaming"]["rows"]["teacher@1+streaming"]
    assert info == {"runs_continuing": 4, "runs": 4, "full_encodes_untimed": 2, "history_frames_encoded_per_run": 1,
                    "prior": "cv-warp", "prior_frames_encoded_per_run": 6}
    assert "student_streaming_over_floor" not in d                              # no student given
    assert "prior" in printed.splitlines()[1] and "prior = the prior's warp and encode" in printed
    assert _bench_module().main(args + ["--no-streaming"]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["teacher@1", "floor"]
