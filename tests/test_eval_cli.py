"""tools/eval.py end to end (subprocess): tiny snapshots + baselines, and the clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.builder import build
from occ_mfd.data.records import OccBatch
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine.checkpoint import save_checkpoint
from occ_mfd.eval.baselines import CopyLast
from occ_mfd.eval.forecasters import PipelineForecaster, load_forecaster, parse_model_spec
from occ_mfd.eval.runner import run_eval
from occ_mfd.grid import GridSpec
from occ_mfd.models.snapshot import InferenceParts, save_snapshot, snapshot_from_parts
from occ_mfd.objectives.flow_matching import OccFlowTeacher
from occ_mfd.objectives.mfd import OccMeanFlowDistillation

REPO = Path(__file__).resolve().parents[1]
G = GridSpec((-2.0, -2.0, -0.4), (2.0, 2.0, 0.4), 0.4)   # 10 × 10 × 2


VAE = dict(type="occ_mfd.models.vae.OccVAE", grid_z=2, channels=(8, 16), latent_channels=2, downsample=2,
           sparse=False)
NET = dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(), heads=1,
           mid_attn=False)
META = dict(data={"pool": 1, "past": 4, "future": 6}, git_rev="test")


def tiny_teacher(randomise: bool = True, **sampler) -> OccFlowTeacher:
    """A tiny OccFM teacher objective (random VAE, forecaster with randomised zero-init gates)."""
    torch.manual_seed(0)
    vae_desc = snapshot_from_parts(InferenceParts("vae", {"vae": build(VAE)})).describe()
    obj = OccFlowTeacher(net=NET, vae=vae_desc, latent_scale=1.0, cond_drop_prob=0.1, **sampler)
    if randomise:
        with torch.no_grad():   # adaLN-Zero gates and the output layer start at 0: the net would be v = 0
            for p in obj.net.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.3)
    return obj


def save_tiny_snapshot(work_dir: Path, grid: GridSpec = G, objective=None) -> Path:
    """The snapshot a training stage of ``objective`` (default: a tiny teacher) would write."""
    objective = objective if objective is not None else tiny_teacher()
    snap = snapshot_from_parts(objective.inference_parts(), grid=grid.to_dict(), **META)
    return save_snapshot(snap, work_dir / "snapshot.pt")


def save_tiny_student(work_dir: Path, s_neq_t_ratio: float = 1.0) -> Path:
    """A one-step student of the tiny teacher whose weights differ from the teacher's."""
    teacher_snap = save_tiny_snapshot(work_dir / "teacher")
    obj = OccMeanFlowDistillation(teacher_snapshot=str(teacher_snap), max_substep=0.25, s_neq_t_ratio=s_neq_t_ratio)
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_tiny_snapshot(work_dir, objective=obj)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), "--threads", "1", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_runner import make_dataset

    tmp = tmp_path_factory.mktemp("cli")
    data = make_dataset(tmp / "data", static=False, n_frames=11)
    return tmp, data, save_tiny_snapshot(tmp / "teacher")


def test_cli_models_and_baselines_match_library(setup):
    tmp, data, ckpt = setup
    out = tmp / "r.json"
    r = run_cli("--data", data, "--model", f"{ckpt}:steps=2", "--model", f"fast={ckpt}:steps=1,cfg=1",
                "--baseline", "copy-last", "--out", out, "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert "split=val" in r.stdout and "shift α=3.0" in r.stdout
    d = json.loads(out.read_text())
    assert [row["name"] for row in d["rows"]] == ["teacher", "fast", "copy-last"]
    assert [(row["steps"], row["nfe"]) for row in d["rows"]] == [(2, 2), (1, 1), (0, 0)]
    assert [m["cfg_scale"] for m in d["protocol"]["models"]] == [2.0, 1.0]
    # Same numbers in-process: the CLI adds nothing but wiring.
    pipe, _ = load_forecaster(ckpt)
    ds = OccSequenceDataset(data, "val", mask=None)
    rows = run_eval(ds, [PipelineForecaster(pipe, "teacher", 2), CopyLast()], grid=G, seed=3, progress=False)
    for got, ref in zip([d["rows"][0], d["rows"][2]], rows):
        assert np.allclose([got["iou"][k] for k in got["iou"]], ref.metrics.iou)
        assert np.allclose([v if v is not None else np.nan for v in got["miou"].values()], ref.metrics.miou,
                           equal_nan=True)


def test_cli_errors(setup, tmp_path):
    tmp, data, ckpt = setup
    r = run_cli("--data", data, "--model", tmp / "nope.pt")
    assert r.returncode == 2 and "nope.pt does not exist" in r.stderr
    r = run_cli("--data", tmp / "nodata", "--baseline", "copy-last")
    assert r.returncode == 2 and "nodata" in r.stderr and "index.json" in r.stderr
    other = save_tiny_snapshot(tmp_path / "other", GridSpec((-4.0, -4.0, -0.4), (4.0, 4.0, 0.4), 0.8))
    r = run_cli("--data", data, "--model", other)
    assert r.returncode == 2 and "grid mismatch" in r.stderr
    assert str(other) in r.stderr and str(data) in r.stderr and "0.8" in r.stderr


def test_student_snapshot_is_one_step_generator(tmp_path):
    path = save_tiny_student(tmp_path / "s")
    pipe, info = load_forecaster(path)
    assert (info.kind, info.steps, info.shift, info.cfg_scale) == ("student", 1, 1.0, 1.0)
    assert load_forecaster(save_tiny_student(tmp_path / "v", 0.0))[1].kind == "vsd"
    # The pipeline at 1 step = the objective's own generator G(x0, c) = x0 + student(x0, 0, c), decoded.
    obj = OccMeanFlowDistillation(teacher_snapshot=str(tmp_path / "s/teacher"))
    obj.student.load_state_dict(pipe.net.state_dict())
    g = torch.Generator().manual_seed(0)
    occ = torch.where(torch.rand(1, 10, 10, 10, 2, generator=g) < 0.6, 17,
                      torch.randint(0, 17, (1, 10, 10, 10, 2), generator=g))
    batch = OccBatch(past=occ[:, :4], future=occ[:, 4:], ego=torch.eye(4).repeat(1, 10, 1, 1))
    out = pipe.forecast(batch, generator=torch.Generator().manual_seed(3))
    _, cond = obj.prepare(batch)
    x0 = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = obj.generate(x0, cond)
        teacher_jump = x0 + obj.teacher(x0, torch.zeros(1), cond)
    assert out.nfe == 1 and torch.allclose(out.latents, ref, atol=1e-5)
    assert not torch.allclose(ref, teacher_jump, atol=1e-3)           # the student's weights, not the teacher's


def test_parse_model_spec():
    s = parse_model_spec("t10=runs/a/latest.pt:steps=10,cfg=1.5")
    assert (s.name, s.path, s.steps, s.cfg_scale) == ("t10", "runs/a/latest.pt", 10, 1.5)
    s = parse_model_spec("runs/a.pt")
    assert (s.name, s.path, s.steps, s.cfg_scale) == (None, "runs/a.pt", None, None)
    assert parse_model_spec("runs/a.pt,cfg=1").cfg_scale == 1.0
    for bad in ("a.pt:steps=x", "a.pt:foo=1", "a.pt:steps=0", "=a.pt"):
        with pytest.raises(ValueError):
            parse_model_spec(bad)


def test_snapshot_sampler_and_training_checkpoint_error(setup, tmp_path):
    """The teacher's sampler settings travel in its snapshot; a training checkpoint is refused with the path of
    the snapshot to use instead."""
    teacher = tiny_teacher(steps=7, shift=2.0, cfg_scale=1.5)
    pipe, info = load_forecaster(save_tiny_snapshot(tmp_path, objective=teacher))
    assert (info.kind, info.steps, info.shift, info.cfg_scale) == ("teacher", 7, 2.0, 1.5)
    assert torch.equal(pipe.net.stem.weight, teacher.net.stem.weight)
    save_checkpoint({"step": 0, "objective": teacher.state_dict(), "config": ""}, tmp_path / "run")
    r = run_cli("--data", setup[1], "--model", tmp_path / "run/latest.pt")
    assert r.returncode == 2 and "training checkpoint" in r.stderr and str(tmp_path / "run/snapshot.pt") in r.stderr


def test_cli_vae_snapshot_row_equals_the_models_own_vae_recon(setup, tmp_path):
    """--vae: a VAE stage's snapshot gets a vae-recon row without any forecaster; with the VAE the teacher was
    built on it scores exactly what --recon scores; a forecaster snapshot given as --vae is refused."""
    tmp, data, ckpt = setup
    vae = tiny_teacher().codec.vae             # the VAE the teacher snapshot was built on
    vae_snap = save_snapshot(snapshot_from_parts(InferenceParts("vae", {"vae": vae}), grid=G.to_dict(), **META),
                             tmp_path / "myvae" / "snapshot.pt")
    out = tmp_path / "r.json"
    r = run_cli("--data", data, "--model", f"{ckpt}:steps=1", "--recon", "--vae", vae_snap,
                "--vae", f"named={vae_snap}", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"vae-recon:myvae", "named", "vae-recon"} <= set(rows)
    assert rows["vae-recon:myvae"]["iou"] == rows["vae-recon"]["iou"] == rows["named"]["iou"]
    assert rows["vae-recon:myvae"]["miou"] == rows["vae-recon"]["miou"]
    r = run_cli("--data", data, "--vae", vae_snap, "--out", tmp_path / "only.json")   # no forecaster needed
    assert r.returncode == 0, r.stderr
    r = run_cli("--data", data, "--vae", ckpt)
    assert r.returncode == 2 and "not a VAE stage's" in r.stderr and str(ckpt) in r.stderr


def test_cli_refiner_is_attached_only_to_models_on_its_vae(setup, tmp_path):
    """--refiner: a refiner trained on the teacher's VAE changes the teacher's forecast and is named in the header;
    one trained on another VAE is refused with both files named."""
    from occ_mfd.objectives.prior_refiner import PriorRefinerObjective

    tmp, data, ckpt = setup

    def refiner_snapshot(vae, name):
        vae_path = save_snapshot(snapshot_from_parts(InferenceParts("vae", {"vae": vae}), grid=G.to_dict(), **META),
                                 tmp_path / name / "vae.pt")
        obj = PriorRefinerObjective(refiner=dict(hidden=4, class_dim=2), vae_snapshot=str(vae_path))
        with torch.no_grad():
            for p in obj.refiner.net[-1].parameters():
                p.normal_(0, 2.0)                  # a refiner that changes the decoding
        return save_snapshot(snapshot_from_parts(obj.inference_parts(), grid=G.to_dict(), **META),
                             tmp_path / name / "snapshot.pt")

    mine = refiner_snapshot(tiny_teacher().codec.vae, "mine")
    plain, refined = tmp_path / "plain.json", tmp_path / "refined.json"
    assert run_cli("--data", data, "--model", f"{ckpt}:steps=1", "--out", plain).returncode == 0
    r = run_cli("--data", data, "--model", f"{ckpt}:steps=1", "--refiner", mine, "--out", refined)
    assert r.returncode == 0, r.stderr
    assert f"decoder refiner={mine}" in r.stdout
    scores = lambda f: {k: json.loads(f.read_text())["rows"][0][k] for k in ("iou", "miou")}   # noqa: E731
    assert scores(plain) != scores(refined)
    other_vae = build(VAE)
    with torch.no_grad():
        for p in other_vae.parameters():
            p.add_(0.1)
    other = refiner_snapshot(other_vae, "other")
    r = run_cli("--data", data, "--model", f"{ckpt}:steps=1", "--refiner", other)
    assert r.returncode == 2 and "another VAE" in r.stderr and str(other) in r.stderr and str(ckpt) in r.stderr
