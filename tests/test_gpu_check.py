"""tools/gpu_check.py on a machine without CUDA: the CPU-side part runs and passes, the CUDA part is reported as
skipped in so many words; the CUDA part's code runs on the CPU as a rehearsal; failures are recorded per item."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _tool():
    spec = importlib.util.spec_from_file_location("occ_mfd_tools_gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "tools/gpu_check.py"), "--out", str(out), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=ENV)
    return r, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_cpu_machine_runs_the_cpu_part_and_says_the_cuda_part_was_skipped(tmp_path):
    r, rep = _run(tmp_path, "--skip", "cpu_bf16_autocast")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "The CUDA part was SKIPPED" in r.stdout and "only the CPU-side checks ran" in r.stdout
    tool = _tool()
    assert set(rep["items"]) == set(tool.CPU_ITEMS + tool.CUDA_ITEMS)
    assert rep["cuda_part"].startswith("skipped: ") and rep["passed"] is True
    for name in tool.CUDA_ITEMS:
        assert rep["items"][name]["status"] == "skip" and "CUDA part skipped" in rep["items"][name]["message"]
    st = rep["items"]["spconv_status"]
    if st["figures"].get("usable"):
        sd = rep["items"]["cpu_sparse_vs_dense"]
        assert sd["status"] == "pass" and sd["figures"]["forward_rel_err"] < 1e-4
        assert sd["figures"]["occupied_fraction"] == pytest.approx(0.14, abs=0.01)


@pytest.mark.slow
def test_rehearsal_runs_the_cuda_part_code_on_the_cpu(tmp_path):
    """Every CUDA item except compile (tests/test_bench_variants.py) and memory (CUDA only), on the CPU with the
    shrunk tiny configs: bf16 dtype checks, the stem vs its twin, a gloo group, teacher@10 vs student@1."""
    r, rep = _run(tmp_path, "--rehearse", "--skip", "compile_forecaster", "--bench-runs", "1", "--bench-warmup", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    items = rep["items"]
    failed = {n: i["message"] for n, i in items.items() if i["status"] == "fail"}
    assert not failed and rep["cuda_part"].startswith("rehearsed on cpu")
    t = items["bf16_teacher_step"]["figures"]
    assert t["network_output_dtypes"] == {"net": ["bfloat16"]} and t["loss_dtype"] == "float32"
    assert t["grad_dtypes"] == ["float32"] and t["params_with_grad"] == t["params"]
    m = items["bf16_mfd_steps"]["figures"]
    assert set(m["student"]["network_output_dtypes"]) == {"student", "teacher", "aux"}
    assert m["generated_dtypes"] == ["float32"]
    assert items["nccl_all_reduce"]["figures"]["backend"] == "gloo"
    b = items["bench_teacher10_vs_student1"]["figures"]
    rows = b["rows"]
    assert b["speedup_vs_teacher10"]["student@1"] == pytest.approx(
        rows["teacher@10"]["ms_median"] / rows["student@1"]["ms_median"], rel=0.02)
    assert rows["student@1+bf16"]["dtype"] == "bfloat16" and rows["student@1"]["dtype"] == "float32"
    assert items["peak_memory_vae_step"]["status"] == "skip"


def test_items_fail_or_skip_on_their_own_and_keep_their_figures():
    tool = _tool()
    chk = tool.Checker(budget_s=100.0, echo=lambda *a, **k: None)

    def fails(figs):
        figs["measured"] = 1.5
        tool.expect(False, "1.5 is too slow")

    def crashes(figs):
        raise RuntimeError("CUDA error: out of memory")

    def skips(figs):
        raise tool.SkipItem("needs CUDA")

    chk.run("a", fails)
    chk.run("b", crashes)
    chk.run("c", skips)
    chk.run("d", lambda figs: figs.update(x=1) or "fine")
    r = chk.results
    assert (r["a"].status, r["a"].figures, r["a"].message.split(" (")[0]) == \
        ("fail", {"measured": 1.5}, "CheckFailed: 1.5 is too slow")
    assert r["b"].status == "fail" and r["b"].message.startswith("RuntimeError: CUDA error: out of memory")
    assert (r["c"].status, r["c"].message) == ("skip", "needs CUDA")
    assert (r["d"].status, r["d"].figures, r["d"].message) == ("pass", {"x": 1}, "fine")
    late = tool.Checker(budget_s=0.0, echo=lambda *a, **k: None)
    late.run("e", lambda figs: "never")
    assert late.results["e"].status == "skip" and "time budget" in late.results["e"].message


def test_card_fit_closed_form():
    fit = _tool().card_fit({1: 5.0, 2: 7.0, 4: 11.0}, 4)
    # 2 GiB per sample on a 3 GiB base; 24 - 1.5 reserve = 22.5 → batch ≤ (22.5 - 3) // 2 = 9; batch 4: 12.5 GiB
    assert fit == {"per_sample_GiB": 2.0, "max_batch_for_24GB": 9, "config_batch_needs_GiB": 12.5, "fits_24GB": True}
    assert _tool().card_fit({1: 20.0, 2: 23.0}, 2)["fits_24GB"] is False


def test_bad_item_names_are_one_line(tmp_path):
    r, rep = _run(tmp_path, "--only", "no_such_item")
    assert r.returncode == 2 and rep is None
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown item(s) ['no_such_item']" in r.stderr


@pytest.mark.gpu
def test_gpu_bf16_steps_and_nccl_on_the_shrunk_configs(tmp_path):
    """The gpu_check items at small size on CUDA: bf16 networks / fp32 losses and gradients in teacher and MFD
    steps, and a 1-process NCCL group set up in torch's documented order."""
    tool = _tool()
    dev = torch.device("cuda")
    world = tool.World(REPO / "configs/tiny", tmp_path, dev, tool.MINI)
    for fn, args in ((tool.item_bf16_teacher_step, (world, 2)), (tool.item_bf16_mfd_steps, (world, 1)),
                     (tool.item_nccl_all_reduce, (dev,))):
        figs = {}
        fn(figs, *args)          # raises CheckFailed with the reason when a check does not hold
    assert figs["backend"] == "nccl"
