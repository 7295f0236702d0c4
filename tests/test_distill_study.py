"""benchmarks/distill_study.py: a quick toy run writes the documented rows; bad method or suite names are
clear errors."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.distill_occ import occ_method  # noqa: E402
from benchmarks.distill_study import check_method, main  # noqa: E402


@pytest.mark.slow
def test_quick_toy_study_rows_and_summary(tmp_path):
    out = tmp_path / "s.json"
    assert main(["--quick", "--methods", "mfd", "dmd2", "--seeds", "0", "--updates", "20", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["method"], r["seed"], r["updates"]) for r in res["rows"]] == [("mfd", 0, 20), ("dmd2", 0, 20)]
    for r in res["rows"]:
        assert {"suite", "energy_distance", "energy_distance_init", "energy_distance_floor", "mode_recall",
                "grad_var", "grad_snr", "ms_per_update", "nfe_per_update", "coupling_error"} <= set(r)
        assert r["energy_distance"] < r["energy_distance_init"]          # 20 updates already help
        assert r["curve"][0] == [0, r["energy_distance_init"]] and r["curve"][-1][0] == 20
    # NFE per student update: MFD integrates teacher and aux over [s, t] (h = 0.02); DMD2 calls each once
    mfd, dmd2 = res["rows"]
    assert dmd2["nfe_per_update"] == 3 and mfd["nfe_per_update"] > 20
    assert res["summary"]["toy"]["mfd"]["energy_distance"] == [mfd["energy_distance"], 0.0]


@pytest.mark.slow
def test_quick_cond_study_row(tmp_path):
    out = tmp_path / "c.json"
    assert main(["--quick", "--suite", "cond", "--methods", "dmd2", "--seeds", "0", "--updates", "10",
                 "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["suite"] == "cond" and row["nfe_per_update"] == 4          # guided teacher (2) + fake + student
    assert 0 <= row["narrow_mass"] <= 1 and row["narrow_mass_reference"] < 0.05   # CFG w = 2 empties them
    assert row["energy_distance_floor"] < row["energy_distance_init"]


def test_unknown_names_are_clear_errors():
    for name in ("senseflow", "ayf", "ayf_meanflow", "senseflow_isg0.5", "mfd_h0.01", "meanflow", "smf", "tvm",
                 "freeflow", "smf_no_warmup", "smf_no_align", "meanflow_official", "freeflow_rw",
                 "freeflow_vsd"):   # implemented now
        check_method(name)
    with pytest.raises(SystemExit, match="unknown method 'senseflow_isg'"):
        check_method("senseflow_isg")
    with pytest.raises(SystemExit, match="unknown method 'mdf'"):
        main(["--methods", "mdf"])
    with pytest.raises(SystemExit, match="unknown suite|suite 'occc'"):
        main(["--suite", "occc"])
    with pytest.raises(ValueError, match="no occupancy configuration"):
        occ_method("toy_only")
    assert occ_method("mfd_h0.005") == ("mfd", {"max_substep": 0.005})
    assert occ_method("smf_no_warmup") == ("smf", {"discrete_updates": 0})
    assert occ_method("smf_no_align") == ("smf", {"align_weight": 0.0})
    assert [occ_method(m)[0] for m in ("meanflow", "tvm", "freeflow")] == ["meanflow", "tvm", "freeflow"]
    assert occ_method("freeflow_rw") == ("freeflow", {"corrector_weighting": "r"})
    assert occ_method("freeflow_vsd") == ("freeflow", {"corrector_weighting": "r", "corrector_time": "uniform"})


@pytest.mark.slow
def test_occ_suite_trains_each_method_through_the_loop_and_scores_its_one_step_student(stages, tmp_path):
    """Suite occ on the session's tiny teacher: every method gets the same student updates at 4:1 (aux methods
    run 5 loop steps per update), its row holds the eval's scores, and a second run reuses the finished work."""
    work, data = stages
    out = tmp_path / "o.json"
    args = ["--suite", "occ", "--methods", "vsd", "cd", "--seeds", "0", "--updates", "2", "--occ-data", str(data),
            "--occ-teacher", str(work / "teacher" / "snapshot.pt"), "--occ-work", str(tmp_path / "w"),
            "--occ-eval-sequences", "2", "--out", str(out)]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for name, steps in (("vsd", 10), ("cd", 2)):
        r = rows[name]
        assert r["suite"] == "occ" and r["updates"] == 2 and 0 <= r["iou_mean_123"] <= 100
        logged = [json.loads(x)["step"] for x in (Path(r["work_dir"]) / "log.jsonl").read_text().splitlines()]
        assert max(logged) == steps, name
    assert rows["vsd"]["nfe_per_update"] == 4 and rows["vsd"]["ms_per_update"] > 0
    assert main(args) == 0                                          # finished runs are reused, not retrained
    again = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert again["vsd"]["iou_mean_123"] == rows["vsd"]["iou_mean_123"] and again["vsd"]["ms_per_update"] is None


@pytest.mark.slow
def test_aux_free_cd_gets_the_same_number_of_student_updates(tmp_path):
    out = tmp_path / "cd.json"
    assert main(["--quick", "--methods", "cd", "--seeds", "0", "--updates", "12", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["updates"] == 12 and row["curve"][-1][0] == 10      # curve every 10 updates at --quick


@pytest.mark.slow
@pytest.mark.parametrize("suite,updates,nfe", [("toy", 20, {"senseflow": 5, "ayf": 4}),
                                                ("cond", 10, {"senseflow": 7, "ayf": 5})])
def test_quick_senseflow_and_ayf_rows_match_the_others(tmp_path, suite, updates, nfe):
    """Both new methods get the same number of student updates and the same row fields as DMD2. NFE per student
    update: SenseFlow = DMD2's (teacher + fake + student) + ISG's teacher step and student forward; AYF = teacher +
    student + the JVP's 2, no aux. Under CFG (cond) every teacher call counts 2."""
    out = tmp_path / "n.json"
    assert main(["--quick", "--suite", suite, "--methods", "dmd2", "senseflow", "ayf", "--seeds", "0",
                 "--updates", str(updates), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    dmd2, sf, ayf = res["rows"]
    assert [(r["method"], r["updates"], r["curve"][-1][0]) for r in res["rows"]] == [
        (m, updates, updates) for m in ("dmd2", "senseflow", "ayf")]
    assert set(sf) == set(dmd2) == set(ayf)
    assert (sf["nfe_per_update"], ayf["nfe_per_update"]) == (nfe["senseflow"], nfe["ayf"])
    assert res["settings"]["updates"] == updates and set(res["summary"][suite]) == {"dmd2", "senseflow", "ayf"}
    if suite == "toy":
        assert sf["energy_distance"] < sf["energy_distance_init"]          # 20 updates already help


def test_relative_grad_variance_restores_the_state_before_every_replicate():
    """Each replicate must see the same state: a forward that schedules a post-step edit (SenseFlow's IDA, CD's
    target EMA) or counts an update (AYF's warm-up) must not leak into the next replicate. Here the gradient is
    1 + k with k a buffer the forward increments: with the state restored every replicate it is 1 every time (zero
    variance); the old code (restore only at the end) saw 1, 2, ..., reps: tr Cov / ||E g||² = var(1..R) / mean²."""
    import torch
    from benchmarks.distill_study import relative_grad_variance

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = torch.nn.Linear(1, 1, bias=False)
            self.register_buffer("k", torch.tensor(0.0))

        def param_groups(self):
            return {"student": list(self.student.parameters())}

        def forward(self, batch, phase):
            loss = (1 + self.k) * self.student.weight.sum()
            self.k += 1
            return type("Out", (), {"loss": loss})()

    obj = Counting()
    assert relative_grad_variance(obj, lambda n: None, 4, 5, 0) == 0.0
    assert float(obj.k) == 0.0                                            # and the state is restored afterwards


@pytest.mark.slow
@pytest.mark.parametrize("suite,updates,nfe", [
    ("toy", 20, {"meanflow": 4, "smf": 7, "smf_no_warmup": 7, "smf_no_align": 4, "tvm": 5}),
    ("cond", 12, {"meanflow": 5, "smf": 9, "smf_no_warmup": 9, "smf_no_align": 5, "tvm": 7})])
def test_quick_flow_map_family_rows_match_the_others(tmp_path, suite, updates, nfe):
    """The flow-map family gets the same student updates and row fields as DMD2. NFE per student update (median):
    MeanFlow = teacher + student + the JVP's 2; TVM = two teacher calls + student + JVP; SMF in phase B (75 % of the
    updates) = MeanFlow's + the alignment's student, teacher and aux; without alignment its median is MeanFlow's;
    FreeFlow (and its project option freeflow_vsd) = teacher + student + 2·(predictor share) + (corrector share) aux:
    between 3 and 4. Under CFG (cond)
    every teacher call counts 2."""
    methods = ["dmd2", *nfe, "freeflow", "freeflow_vsd"]
    out = tmp_path / "f.json"
    assert main(["--quick", "--suite", suite, "--methods", *methods, "--seeds", "0", "--updates", str(updates),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert [(r["method"], r["updates"], r["curve"][-1][0]) for r in res["rows"]] == [
        (m, updates, updates - updates % 10) for m in methods]
    assert all(set(r) == set(rows["dmd2"]) for r in rows.values())
    assert {m: rows[m]["nfe_per_update"] for m in nfe} == nfe
    cfg = 1 if suite == "toy" else 2
    assert all(cfg + 2 < rows[m]["nfe_per_update"] < cfg + 3 for m in ("freeflow", "freeflow_vsd"))
    assert set(res["summary"][suite]) == set(methods)


def test_occ_smf_budget_is_exactly_the_student_updates(stages):
    """Suite occ: SMF's loop steps for ``updates`` student updates (K_w = 25 %, 20 aux-only updates at the switch,
    then 4:1, the loss-ratio switch off); the other flow-map methods: aux-free ones one step per update, FreeFlow 5."""
    from benchmarks.distill_occ import method_config

    work, data = stages
    teacher = str(work / "teacher" / "snapshot.pt")
    steps = {m: method_config(m, 0, 8, str(data), teacher).train.max_steps
             for m in ("meanflow", "tvm", "freeflow", "smf", "smf_no_warmup", "smf_no_align")}
    # smf: 2 phase-A + 20 + 6 phase-B updates with 4 aux between them; no warm-up: 20 + 8 + 4·7; no align: 8
    assert steps == {"meanflow": 8, "tvm": 8, "freeflow": 40, "smf": 2 + 20 + 6 + 4 * 5, "smf_no_warmup": 56,
                     "smf_no_align": 8}
    cfg = method_config("smf", 0, 8, str(data), teacher)
    assert cfg.objective.discrete_updates == 2 and cfg.objective.switch_loss_ratio == 0.0
    assert set(cfg.optim) == {"student", "aux"}
    assert set(method_config("smf_no_align", 0, 8, str(data), teacher).optim) == {"student"}   # no aux group
    ff = {m: method_config(m, 0, 8, str(data), teacher).objective for m in ("freeflow", "freeflow_vsd")}
    assert (ff["freeflow"].corrector_weighting, ff["freeflow"].corrector_time) == ("uniform", "logit_normal")  # spec
    assert (ff["freeflow_vsd"].corrector_weighting, ff["freeflow_vsd"].corrector_time) == ("r", "uniform")
    assert method_config("freeflow_vsd", 0, 8, str(data), teacher).train.max_steps == 40
