"""Stabilised MeanFlow (SMF): the phase-A target is the teacher's Euler mean velocity (exact on a point mass, first
order in h on the Gaussian), the switch at K_w and by the loss ratio, the schedule (and its resume, and the loop-step
count the occupancy study relies on), the alignment term's exact gradient and sign, and that with both parts off it
is MeanFlow."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from flow_map_toys import ConstantMap, GaussianMap, PointMap  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint  # noqa: E402
from occ_mfd.objectives.meanflow import MeanFlow  # noqa: E402
from occ_mfd.objectives.smf import StabilizedMeanFlow  # noqa: E402
from test_mfd import MU, SIG, GaussianFlow, PointMassFlow  # noqa: E402
from test_senseflow import ConstantFlow  # noqa: E402

torch.set_num_threads(1)
D = 3
M, P = [1.0, -2.0, 0.5], [0.0, 1.0, 3.0]


def _constant(**kw):
    """Teacher v = m, student u = p (ConstantMap), aux a trainable point mass (its values do not matter here)."""
    kw = {"switch_loss_ratio": 0.0, **kw}
    aux = PointMassFlow([0.0] * D, trainable=True) if kw.get("align_weight", 1.0) > 0 else None
    return StabilizedMeanFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), aux, lambda x1: (x1, None), **kw)


def test_phase_a_target_is_the_teachers_euler_mean_velocity():
    """Point-mass teacher: Euler is exact, U_T = (a − x_s)/(1 − s) for every interval; no JVP in phase A."""
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    obj = StabilizedMeanFlow(PointMassFlow(a), FlowMapEndpoint(ConstantMap(P)), None, lambda x1: (x1, None),
                             align_weight=0.0, max_substep=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, D, generator=g, dtype=torch.float64)
    s = 0.5 * torch.rand(32, generator=g, dtype=torch.float64)
    t = s + 0.4 * torch.rand(32, generator=g, dtype=torch.float64)
    u_tgt, logs = obj.target(x, s, t, None, obj.flow_map(x, s, t))
    torch.testing.assert_close(u_tgt, (a - x) / (1 - s[:, None]), rtol=1e-12, atol=1e-12)
    assert logs == {"nfe_teacher": float(math.ceil(float((t - s).max()) / 0.05)), "nfe_jvp": 0.0}


def test_phase_a_target_converges_to_the_true_average_velocity_at_first_order():
    """Gaussian teacher: the Euler mean velocity tends to the exact one, (X − x)/(t − s), with error O(h)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, generator=g, dtype=torch.float64)
    s = 0.5 * torch.rand(64, generator=g, dtype=torch.float64)
    t = s + 0.1 + 0.4 * torch.rand(64, generator=g, dtype=torch.float64)
    exact = GaussianMap()(x, s, t).detach()
    err = {}
    for h in (0.01, 0.001):
        obj = StabilizedMeanFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap()), None,
                                 lambda x1: (x1, None), align_weight=0.0, max_substep=h)
        err[h] = float((obj.target(x, s, t, None, exact)[0] - exact).abs().max())
    assert err[0.001] < 1e-2 and 7 < err[0.01] / err[0.001] < 13         # first order: ×10 in h, ×10 in error


def _drive(obj, student_updates, batch=8):
    """Run the objective's own schedule until ``student_updates`` student updates: → (phases, phase-A flags)."""
    phases, warm = [], []
    step = 0
    while phases.count("student") < student_updates:
        ph = obj.phase(step)
        out = obj(torch.zeros(batch, D, dtype=torch.float64), ph)
        phases.append(ph)
        if ph == "student":
            warm.append(out.logs["warmup_phase"])
        step += 1
    return phases, warm


def test_the_switch_happens_at_k_w_then_aux_catches_up_then_4_to_1():
    torch.manual_seed(0)
    obj = _constant(discrete_updates=3, aux_steps=2, switch_aux_updates=3)
    assert obj.in_warmup and obj.kind == "smf" and set(obj.param_groups()) == {"student", "aux"}
    phases, warm = _drive(obj, 6)
    S, A = "student", "aux"
    assert phases == [S, S, S, A, A, A, S, A, A, S, A, A, S]
    assert warm == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and int(obj._switched_at) == 3
    assert len(phases) == StabilizedMeanFlow.loop_steps(6, 3, 2, 1, 3)
    # the schedule resumes from a checkpoint: a fresh objective with the state dict continues the same way
    state = obj.state_dict()
    again = _constant(discrete_updates=3, aux_steps=2, switch_aux_updates=3)
    again.load_state_dict(state)
    assert not again.in_warmup and [again.phase(0)] == [A] == [obj.phase(0)]


@pytest.mark.parametrize("updates,k_w,aux_steps,student_steps,switch", [(7, 2, 4, 1, 20), (9, 0, 2, 2, 5),
                                                                        (4, 4, 3, 1, 2), (5, 9, 3, 1, 2)])
def test_loop_steps_counts_the_driven_schedule(updates, k_w, aux_steps, student_steps, switch):
    obj = _constant(discrete_updates=k_w, aux_steps=aux_steps, student_steps=student_steps, switch_aux_updates=switch)
    phases, _ = _drive(obj, updates, batch=2)
    assert len(phases) == StabilizedMeanFlow.loop_steps(updates, k_w, aux_steps, student_steps, switch)
    assert StabilizedMeanFlow.loop_steps(updates, k_w, aux_steps, student_steps, switch, align=False) == updates


def test_the_loss_ratio_switch():
    """Residual r0 at the first update, then 0 (the student is put on the teacher): the EMA 0.9^j r0 falls below
    0.1 r0 after j = 22 zero updates (0.9^21 ≈ 0.109, 0.9^22 ≈ 0.098), so phase B starts after update 23."""
    obj = _constant(discrete_updates=1000, switch_loss_ratio=0.1, align_weight=0.0)
    x = torch.zeros(4, D, dtype=torch.float64)
    obj(x)
    assert math.isclose(float(obj._residual0), sum((p - m) ** 2 for p, m in zip(P, M)), rel_tol=1e-12)
    with torch.no_grad():
        obj.flow_map.p.copy_(torch.tensor(M, dtype=torch.float64))
    for _ in range(21):
        obj(x)
    assert obj.in_warmup
    obj(x)
    assert not obj.in_warmup and int(obj._switched_at) == 23 and obj.phase(0) == "student"   # no aux: no catch-up


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_alignment_gradient_is_dmd2s_and_moves_the_sample_toward_the_teacher(weight):
    """Student X(z, 0, 1) = p for every z (PointMap); teacher a point mass at a; aux = the student's own flow (a point
    mass at p). DMD2's data predictions are exact: x̂_T = a, x̂_A = p, so g = (p − a)/w with w = mean|p − a| + 1e-6
    and dL/dp = λ (p − a)/(D w): descent moves the sample toward a."""
    a, p = torch.tensor(M, dtype=torch.float64), torch.tensor(P, dtype=torch.float64)
    obj = StabilizedMeanFlow(PointMassFlow(a), FlowMapEndpoint(PointMap(P)), PointMassFlow(P, trainable=True),
                             lambda x1: (x1, None), discrete_updates=0, align_weight=weight)
    torch.manual_seed(0)
    loss, logs = obj.alignment_loss(torch.zeros(16, D, dtype=torch.float64), None)
    loss.backward()
    w = float((p - a).abs().mean()) + 1e-6
    # DMD2 computes w in fp32 (its normaliser), hence rtol 1e-6
    torch.testing.assert_close(obj.flow_map.p.grad, weight * (p - a) / (D * w), rtol=1e-6, atol=0)
    assert logs["nfe_aux"] == 1.0 and logs["nfe_teacher"] == 1.0
    new = p - 0.5 * obj.flow_map.p.grad
    assert (new - a).norm() < (p - a).norm()


def test_phase_b_adds_the_alignment_to_meanflows_loss():
    """With both parts off SMF is MeanFlow (same draws, same loss); with alignment its phase-B loss adds λ·L_TDA."""
    x1 = MU + SIG * torch.randn(64, 1, dtype=torch.float64)
    torch.manual_seed(3)
    ref = MeanFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(0.3)), lambda x1: (x1, None))(x1)
    smf = StabilizedMeanFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(0.3)), None,
                             lambda x1: (x1, None), discrete_updates=0, align_weight=0.0)
    torch.manual_seed(3)
    out = smf(x1)
    assert float(out.loss) == float(ref.loss) and out.logs["warmup_phase"] == 0.0
    assert math.isclose(float(out.loss), 0.09 / 0.1, rel_tol=1e-9)          # c²/(c² + ε), c = 0.3 (test_meanflow)
    aligned = StabilizedMeanFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(0.3)),
                                 PointMassFlow([MU], trainable=True), lambda x1: (x1, None), discrete_updates=0)
    torch.manual_seed(3)
    out = aligned(x1)
    assert math.isclose(float(out.loss), 0.9 + float(out.logs["tda_loss"]), rel_tol=1e-9)
    assert out.logs["nfe_student"] == 2.0 and out.logs["nfe_teacher"] == 2.0 and out.logs["nfe_aux"] == 1.0


def test_bad_input_is_a_clear_error():
    student = FlowMapEndpoint(ConstantMap(P))
    with pytest.raises(ValueError, match="needs an aux flow"):
        StabilizedMeanFlow(ConstantFlow(M), student, None, lambda b: (b, None))
    no_align = _constant(align_weight=0.0)
    assert set(no_align.param_groups()) == {"student"} and no_align.phase(0) == "student"
    with pytest.raises(ValueError, match="no aux phase"):
        no_align(torch.zeros(2, D, dtype=torch.float64), "aux")
    with pytest.raises(ValueError, match="interval input"):
        StabilizedMeanFlow(ConstantFlow(M), MLPVelocity(), None, lambda b: (b, None), align_weight=0.0)
    with pytest.raises(ValueError, match="switch_loss_ratio"):
        _constant(switch_loss_ratio=1.0)
