"""tools/bench.py's --bf16 / --channels-last / --compile rows on CPU: each row records its dtype (bf16 rows say
bfloat16), each variant computes what the plain pipeline computes, and the bf16 rows really run in bf16."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.eval.speed import pipeline_stages
from test_eval_cli import save_tiny_snapshot, save_tiny_student

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
            outs[name] = x
    return outs


def test_bench_bf16_and_channels_last_rows_record_their_dtype(snaps, tmp_path, capsys):
    teacher, student = snaps
    out = tmp_path / "bench.json"
    rc = _bench_module().main(["--teacher", str(teacher), "--student", str(student), "--steps", "1", "2",
                               "--runs", "2", "--warmup", "1", "--bf16", "--channels-last", "--no-train",
                               "--out", str(out)])
    assert rc == 0
    assert "--bf16 on CPU" in capsys.readouterr().err
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
