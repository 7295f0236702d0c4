"""What the flow-map family (MeanFlow, SMF, TVM, FreeFlow; AYF too) shares: the K-step flow-map sampler (exact
composition on the Gaussian, the teacher's K-step Euler at initialisation, through the pipeline), the JVP through the
tiny forecaster with and without grad against fp64 differences, the "auto" JVP fallback, and each tiny config end to
end on the session's tiny teacher: it starts as the teacher's one-step jump, trains through the loop, writes a
flow-map snapshot that eval runs at 1, 2 and 4 steps, and refuses a snapshot without an interval input."""
import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flow_map_toys import GaussianMap, NoForwardAD  # noqa: E402
from occ_mfd.builder import build, resolve_type  # noqa: E402
from occ_mfd.data.records import collate_sequences  # noqa: E402
from occ_mfd.data.sequences import OccSequenceDataset  # noqa: E402
from occ_mfd.engine.checkpoint import load_checkpoint, load_config_from_checkpoint  # noqa: E402
from occ_mfd.engine.loop import train  # noqa: E402
from occ_mfd.eval.forecasters import PipelineForecaster, load_forecaster  # noqa: E402
from occ_mfd.eval.runner import run_eval  # noqa: E402
from occ_mfd.flow.solver import euler_integrate  # noqa: E402
from occ_mfd.flow.time_sampling import time_grid  # noqa: E402
from occ_mfd.models.flow_map import (DecomposedLayerNorm, FlowMapEndpoint, FlowMapNet, JvpBackend,  # noqa: E402
                                     flow_map_jvp, flow_map_sample)
from occ_mfd.models.forecaster import ForecastCond, OccForecaster  # noqa: E402
from occ_mfd.models.pipeline import OccForecastPipeline, SamplerSettings  # noqa: E402
from occ_mfd.models.snapshot import FLOW_MAP_KINDS, FORECASTER_KINDS, load_snapshot, save_snapshot  # noqa: E402
from stage_fixtures import stage_config  # noqa: E402
from test_mfd import MU, SIG  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
METHODS = ("meanflow", "smf", "tvm", "freeflow")
B = 3


# ------------------------------------------------------------------------------------------------ the sampler
def test_the_flow_map_sampler_composes_exact_maps_exactly():
    """X(·, t_k, t_{k+1}) composed over any grid is X(·, 0, 1) for the exact map: 1, 2 and 4 steps give the same
    sample. Euler on the endpoint field u(x, t_k, 1) (the pipeline's sampler before flow maps had their own) does
    not."""
    z = torch.randn(256, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fm = GaussianMap()
    exact = MU + SIG * z                                             # X(z, 0, 1) = mu + (r_1 / r_0) z, r_1 = σ
    with torch.no_grad():
        for k in (1, 2, 4):
            grid = time_grid(k, 1.0, dtype=torch.float64)
            torch.testing.assert_close(flow_map_sample(fm, z, grid), exact, rtol=0, atol=1e-12)
        endpoint_euler = euler_integrate(lambda x, t: fm(x, t, torch.ones_like(t)), z,
                                         time_grid(4, 1.0, dtype=torch.float64))
    assert float((endpoint_euler - exact).abs().max()) > 1e-2


def _forecaster(seed=0):
    torch.manual_seed(seed)
    net = OccForecaster(latent_channels=2, past=2, future=2, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attn_levels=(0,), heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))                      # a trained teacher's output layer is not zero
    x = torch.randn(B, 2, 2, 4, 4)
    cond = ForecastCond(torch.randn(B, 2, 2, 4, 4), torch.eye(4).expand(B, 4, 4, 4).clone())
    return net, x, cond


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_at_init_the_k_step_flow_map_sampler_is_the_teachers_k_step_euler(cfg_scale):
    """u ≡ net at init, so x + (t_{k+1} − t_k)·u(x, t_k, t_{k+1}) is the teacher's Euler step: the pipeline samples the
    flow-map student at 1 step as the teacher's one-step jump and at K steps as the teacher's K-step Euler, exactly
    (with or without guidance)."""
    net, x0, cond = _forecaster()
    sampler = SamplerSettings(steps=1, shift=1.0, cfg_scale=cfg_scale)
    student = OccForecastPipeline(None, FlowMapEndpoint(FlowMapNet(copy.deepcopy(net))), sampler)
    teacher = OccForecastPipeline(None, net, sampler)
    with torch.no_grad():
        jump = x0 + net(x0, torch.zeros(B), cond) if cfg_scale == 1.0 else None
        for k in (1, 2, 4):
            got = student.sample(cond, x0, steps=k)
            torch.testing.assert_close(got, teacher.sample(cond, x0, steps=k), rtol=0, atol=0)
            if k == 1 and jump is not None:
                torch.testing.assert_close(got, jump, rtol=0, atol=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        student.sample(cond, x0, steps=0)
    with pytest.raises(ValueError, match="K >= 1"):
        flow_map_sample(student.net.flow_map, x0, torch.zeros(1), cond)


def test_the_pipeline_uses_the_flow_maps_own_jumps_once_it_has_learned():
    """With a trained Δt path the pipeline's K-step sample is x ← x + Δt·u(x, t_k, t_{k+1}) (hand-rolled here), not
    Euler on the endpoint field."""
    net, x0, cond = _forecaster()
    fm = FlowMapNet(net)
    with torch.no_grad():
        for p in fm.dt_embed.parameters():
            p.add_(0.2 * torch.randn_like(p))
        pipe = OccForecastPipeline(None, FlowMapEndpoint(fm), SamplerSettings(steps=2, shift=1.0, cfg_scale=1.0))
        half = torch.full((B,), 0.5)
        x = x0 + 0.5 * fm(x0, torch.zeros(B), half, cond)
        x = x + 0.5 * fm(x, half, torch.ones(B), cond)
        torch.testing.assert_close(pipe.sample(cond, x0), x, rtol=1e-6, atol=1e-6)
        endpoint = x0 + 0.5 * fm(x0, torch.zeros(B), torch.ones(B), cond)
        endpoint = endpoint + 0.5 * fm(endpoint, half, torch.ones(B), cond)
        assert float((pipe.sample(cond, x0) - endpoint).abs().max()) > 1e-4


# ------------------------------------------------------------------------------------------------ the JVPs
def test_the_terminal_jvp_of_the_tiny_forecaster_and_its_gradient_match_fp64_differences():
    """Tangent (0, 0, 1) (TVM, FreeFlow, AYF-LMD) through the tiny forecaster: torch.func.jvp in fp32 (math kernel)
    against an fp64 central difference; and, with grad (TVM), the weight gradient of ⟨w, ∂_t u⟩ from torch.func in
    fp64 against the gradient of the fp64 difference (ε = 1e-6)."""
    net, x, cond = _forecaster(1)
    fm = FlowMapNet(net)
    with torch.no_grad():
        for p in fm.dt_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s, t = torch.tensor([0.1, 0.4, 0.0]), torch.tensor([0.6, 0.9, 1.0])
    tangents = (torch.zeros_like(x), torch.zeros(B), torch.ones(B))
    fm64 = copy.deepcopy(fm).double()
    c64 = ForecastCond(cond.past_latents.double(), cond.ego.double())
    p64 = tuple(a.double() for a in (x, s, t))
    t64 = tuple(a.double() for a in tangents)
    fn = lambda x_, s_, t_: fm(x_, s_, t_, cond)  # noqa: E731
    fn64 = lambda x_, s_, t_: fm64(x_, s_, t_, c64)  # noqa: E731
    _, tangent = flow_map_jvp(fn, (x, s, t), tangents)
    _, ref = flow_map_jvp(fn64, p64, t64, method="fd", eps=1e-6)
    assert float((tangent.double() - ref).norm() / ref.norm()) <= 1e-3
    w = torch.randn_like(ref)
    grads = {}
    for method in ("func", "fd"):
        fm64.zero_grad()
        _, tan = flow_map_jvp(fn64, p64, t64, method=method, eps=1e-6, with_grad=True)
        (tan * w).sum().backward()
        grads[method] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                   for p in fm64.parameters()])
    rel = float((grads["func"] - grads["fd"]).norm() / grads["fd"].norm())
    assert rel <= 1e-4, rel
    assert float(grads["func"].norm()) > 0
    with torch.no_grad():                                              # without grad there is no graph
        _, no_graph = flow_map_jvp(fn64, p64, t64, with_grad=True)
    assert not no_graph.requires_grad


def test_with_grad_the_layer_norm_tangent_has_the_right_gradient():
    """PyTorch's fused layer_norm gives its forward-mode tangent a wrong weight gradient (≈ 14 % off here); with grad,
    flow_map_jvp computes layer norms from primitive ops, whose forward equals the fused op's (affine or not) and
    whose tangent's gradient equals the fp64 difference's."""
    x = torch.randn(5, 8, dtype=torch.float64)
    w8, b8 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with DecomposedLayerNorm():
        mine = torch.nn.functional.layer_norm(x, (8,), w8, b8, eps=1e-6)
        plain = torch.nn.LayerNorm(8, elementwise_affine=False, eps=1e-6).double()(x)
    torch.testing.assert_close(mine, torch.nn.functional.layer_norm(x, (8,), w8, b8, eps=1e-6))
    torch.testing.assert_close(plain, torch.nn.functional.layer_norm(x, (8,), eps=1e-6))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).double()
    fn = lambda x_, s_, t_: net(x_ * t_[:, None])  # noqa: E731
    primals = (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
               torch.rand(5, dtype=torch.float64) + 0.5)
    tangents = (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                torch.ones(5, dtype=torch.float64))
    w = torch.randn(5, 3, dtype=torch.float64)
    grads = {}
    for method in ("func", "fd"):
        net.zero_grad()
        (flow_map_jvp(fn, primals, tangents, method=method, eps=1e-6, with_grad=True)[1] * w).sum().backward()
        grads[method] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                   for p in net.parameters()])              # the last bias: no tangent dependence
    assert float((grads["func"] - grads["fd"]).norm() / grads["fd"].norm()) < 1e-6



def test_the_auto_backend_falls_back_to_the_difference_once():
    fn = lambda x, s, t: NoForwardAD.apply(x * t[:, None])  # noqa: E731
    primals = (torch.ones(2, 2), torch.zeros(2), torch.full((2,), 3.0))
    tangents = (torch.zeros(2, 2), torch.zeros(2), torch.ones(2))
    with pytest.raises((RuntimeError, NotImplementedError)):
        JvpBackend("func")(fn, primals, tangents)
    auto = JvpBackend("auto")
    primal, tangent = auto(fn, primals, tangents)
    assert primal is None and auto.method == "fd"
    torch.testing.assert_close(tangent, torch.ones(2, 2), rtol=0, atol=1e-2)   # d/dt (x t) = x, fp32 difference
    with pytest.raises(ValueError, match="jvp must be one of"):
        JvpBackend("forward")


# ------------------------------------------------------------------------------------------- the occupancy stages
def test_the_flow_map_kinds_are_forecasters():
    assert set(METHODS) | {"ayf"} == set(FLOW_MAP_KINDS) and set(FLOW_MAP_KINDS) <= set(FORECASTER_KINDS)


#: small schedules so that a few loop steps reach every phase (SMF: 1 phase-A update, 1 aux-only, then 1:1)
QUICK = {"meanflow": {}, "tvm": {}, "freeflow": {"aux_steps": 1},
         "smf": {"discrete_updates": 1, "switch_aux_updates": 1, "aux_steps": 1, "max_substep": 0.5}}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_occ_stage_starts_as_the_teacher_trains_and_evaluates_at_1_2_4_steps(method, stages, tmp_path):
    tmp, data = stages
    cfg = Config.fromfile(str(REPO / f"configs/tiny/{method}.py"))
    obj_cfg = {**cfg.objective.to_dict(), "teacher_snapshot": str(tmp / "teacher"), "latent_cache_mb": 0.0,
               **QUICK[method]}
    obj = resolve_type(obj_cfg["type"])(**{k: v for k, v in obj_cfg.items() if k != "type"})
    assert obj.kind == method
    ds = OccSequenceDataset(str(data), split="train", past=4, future=6, pool=1, mask=None)
    x1, cond = obj.prepare(collate_sequences([ds[0], ds[1]]))
    z = torch.randn_like(x1)
    with torch.no_grad():   # the flow map's one-step sample is the teacher's (unguided) one-step Euler jump, exactly
        torch.testing.assert_close(obj.generate(z, cond), z + obj.teacher(z, torch.zeros(2), cond), rtol=0, atol=0)
    optim = {g: dict(lr=1e-3, grad_clip=1.0) for g in obj.param_groups()}
    train(stage_config(data, obj_cfg, optim, 4), tmp_path / method)
    pipe, info = load_forecaster(tmp_path / method)
    assert (info.kind, info.steps, info.cfg_scale, info.flow_map) == (method, 1, 1.0, True)
    teacher = load_snapshot(tmp / "teacher").weights["net"]
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.net.flow_map.net.state_dict().items())
    val = OccSequenceDataset(str(data), split="val", past=4, future=6, pool=1, mask=None)
    rows = run_eval(val, [PipelineForecaster(pipe, method, steps=k) for k in (1, 2, 4)], grid=val.grid,
                    max_sequences=1, progress=False)
    assert [(r.steps, r.nfe, r.extra["sampler"]) for r in rows] == [(1, 1, "flow_map"), (2, 2, "flow_map"),
                                                                    (4, 4, "flow_map")]
    # the stored config rebuilds without the teacher's files, and the objective's state resumes from the checkpoint
    stored = build(load_config_from_checkpoint(tmp_path / method / "latest.pt").objective)
    stored.load_state_dict(load_checkpoint(tmp_path / method / "latest.pt")["objective"])
    assert stored.kind == method
    if method == "smf":   # S (phase A, then the switch) → A (catch-up) → S (phase B) → A: phase B resumes
        assert (int(stored._updates), int(stored._switched_at), stored.in_warmup) == (2, 1, False)
        assert stored.phase(0) == "student" and set(stored.param_groups()) == {"student", "aux"}
    # a flow-map kind whose network has no interval input is a clear error
    snap = load_snapshot(tmp / "teacher")
    snap.kind = method
    save_snapshot(snap, tmp_path / "fake.pt")
    with pytest.raises(ValueError, match="no interval input"):
        load_forecaster(tmp_path / "fake.pt")


@pytest.mark.parametrize("scale", ["tiny", "nuscenes"])
@pytest.mark.parametrize("method", METHODS)
def test_every_config_names_an_existing_class_with_those_arguments(method, scale):
    cfg = Config.fromfile(str(REPO / f"configs/{scale}/{method}.py"))
    kwargs = {k: v for k, v in cfg.objective.to_dict().items() if k != "type"}
    cls = resolve_type(cfg.objective.type)
    inspect.signature(cls).bind(**kwargs)                               # every key is a constructor argument
    groups = {"meanflow": {"student"}, "tvm": {"student"}, "smf": {"student", "aux"}, "freeflow": {"student", "aux"}}
    assert set(cfg.optim) == groups[method]
