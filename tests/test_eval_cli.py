"""tools/eval.py end to end (subprocess): a tiny checkpoint + baselines, and the clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

from occ_mfd.engine.builder import build
from occ_mfd.engine.checkpoint import config_text, save_checkpoint
from occ_mfd.grid import GridSpec

REPO = Path(__file__).resolve().parents[1]
G = GridSpec((-2.0, -2.0, -0.4), (2.0, 2.0, 0.4), 0.4)   # 10 × 10 × 2


def tiny_teacher_config() -> Config:
    vae = dict(type="occ_mfd.models.vae.OccVAE", grid_z=2, channels=(8, 16), latent_channels=2, downsample=2,
               sparse=False)
    net = dict(type="occ_mfd.models.forecaster.OccForecaster", latent_channels=2, past=4, future=6,
               base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(), heads=1, mid_attn=False)
    obj = dict(type="occ_mfd.flow.fm_objective.FlowMatchingObjective", net=net, cond_drop_prob=0.1,
               prepare=dict(type="occ_mfd.models.world_model.make_prepare",
                            codec=dict(type="occ_mfd.models.world_model.LatentCodec", vae=vae)))
    return Config(dict(objective=obj, data=dict(pool=1, past=4, future=6)))


def save_tiny_checkpoint(work_dir: Path, grid: GridSpec = G) -> Path:
    cfg = tiny_teacher_config()
    torch.manual_seed(0)
    objective = build(cfg.objective)
    save_checkpoint({"step": 0, "objective": objective.state_dict(), "optimizers": {}, "ema": None,
                     "config": config_text(cfg), "grid": grid.to_dict(), "git_rev": "test"}, work_dir)
    return work_dir / "latest.pt"


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), "--threads", "1", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_runner import make_dataset

    tmp = tmp_path_factory.mktemp("cli")
    data = make_dataset(tmp / "data", static=False, n_frames=11)
    return tmp, data, save_tiny_checkpoint(tmp / "ckpt")


def test_cli_models_and_baselines_match_library(setup):
    from occ_mfd.data.sequences import OccSequenceDataset
    from occ_mfd.eval.baselines import CopyLast
    from occ_mfd.eval.forecasters import PipelineForecaster, load_forecaster
    from occ_mfd.eval.runner import run_eval

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
    other = save_tiny_checkpoint(tmp_path / "other", GridSpec((-4.0, -4.0, -0.4), (4.0, 4.0, 0.4), 0.8))
    r = run_cli("--data", data, "--model", other)
    assert r.returncode == 2 and "grid mismatch" in r.stderr
    assert str(other) in r.stderr and str(data) in r.stderr and "0.8" in r.stderr


def save_tiny_student(work_dir: Path, r_not_equal_t_ratio: float = 1.0) -> Path:
    t = tiny_teacher_config().objective
    net = t.net.to_dict() if hasattr(t.net, "to_dict") else dict(t.net)
    obj = dict(type="occ_mfd.distill.mfd.MeanFlowDistillation", teacher=net, student=net, aux=net,
               prepare=t.prepare, cfg_scale=2.0, ode_step=0.25, r_not_equal_t_ratio=r_not_equal_t_ratio)
    cfg = Config(dict(objective=obj, data=dict(pool=1, past=4, future=6)))
    torch.manual_seed(1)
    objective = build(cfg.objective)
    with torch.no_grad():   # zero-initialised gates would make the student the identity jump: randomise
        for p in objective.student.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.3)
    save_checkpoint({"step": 0, "objective": objective.state_dict(), "optimizers": {}, "ema": None,
                     "config": config_text(cfg), "grid": G.to_dict(), "git_rev": "test"}, work_dir)
    return work_dir / "latest.pt"


def test_student_checkpoint_is_one_step_generator(tmp_path):
    from occ_mfd.data.records import OccBatch
    from occ_mfd.engine.checkpoint import build_objective_from_checkpoint
    from occ_mfd.eval.forecasters import load_forecaster

    ckpt = save_tiny_student(tmp_path / "s")
    pipe, info = load_forecaster(ckpt)
    assert (info.kind, info.steps, info.shift, info.cfg_scale) == ("student", 1, 1.0, 1.0)
    assert load_forecaster(save_tiny_student(tmp_path / "v", 0.0))[1].kind == "vsd"
    # The pipeline at 1 step = the objective's own generator G(x0, c) = x0 + student(x0, 0, c), decoded.
    obj = build_objective_from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    occ = torch.where(torch.rand(1, 10, 10, 10, 2, generator=g) < 0.6, 17,
                      torch.randint(0, 17, (1, 10, 10, 10, 2), generator=g))
    batch = OccBatch(past=occ[:, :4], future=occ[:, 4:], ego=torch.eye(4).repeat(1, 10, 1, 1))
    out = pipe.forecast(batch, generator=torch.Generator().manual_seed(3))
    _, cond = obj.prepare(batch)
    x0 = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = obj.generate(x0, cond)
    assert out.nfe == 1 and torch.allclose(out.latents, ref, atol=1e-5)
    assert not torch.allclose(ref, x0, atol=1e-3)


def test_parse_model_spec():
    from occ_mfd.eval.forecasters import parse_model_spec

    s = parse_model_spec("t10=runs/a/latest.pt:steps=10,cfg=1.5")
    assert (s.name, s.path, s.steps, s.cfg_scale) == ("t10", "runs/a/latest.pt", 10, 1.5)
    s = parse_model_spec("runs/a.pt")
    assert (s.name, s.path, s.steps, s.cfg_scale) == (None, "runs/a.pt", None, None)
    assert parse_model_spec("runs/a.pt,cfg=1").cfg_scale == 1.0
    for bad in ("a.pt:steps=x", "a.pt:foo=1", "a.pt:steps=0", "=a.pt"):
        with pytest.raises(ValueError):
            parse_model_spec(bad)


def test_objective_pipeline_is_preferred(tmp_path):
    """An objective with pipeline() (OccFlowTeacher) is asked for its sampler; no attribute fallback."""
    from occ_mfd.eval.forecasters import load_forecaster

    vae = dict(type="occ_mfd.models.vae.OccVAE", grid_z=2, channels=(8, 16), latent_channels=2, downsample=2,
               sparse=False)
    obj = dict(type="occ_mfd.models.teacher.OccFlowTeacher", vae=vae, steps=7, shift=2.0, cfg_scale=1.5,
               net=dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(),
                        heads=1, mid_attn=False))
    cfg = Config(dict(objective=obj, data=dict(pool=1, past=4, future=6)))
    objective = build(cfg.objective)
    save_checkpoint({"step": 0, "objective": objective.state_dict(), "optimizers": {}, "ema": None,
                     "config": config_text(cfg), "grid": G.to_dict(), "git_rev": "test"}, tmp_path)
    pipe, info = load_forecaster(tmp_path / "latest.pt")
    assert (info.via, info.kind, info.steps, info.shift, info.cfg_scale) == ("pipeline()", "teacher", 7, 2.0, 1.5)
    assert torch.equal(pipe.net.stem.weight, objective.net.stem.weight)
