"""FreeFlow: the predictor's residual vanishes for the exact Gaussian flow map from the prior and is the closed form
c(1 − β(t)t) for a map off by c, the corrector's exact VSD gradient and sign on point masses, the balance λ and the
whole update's gradient on constant fields, the project options (corrector weighted by r, by hand; r ~ U(0, 1)), that
it never reads data, the batch split helper, and bad input."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from flow_map_toys import ConstantMap, GaussianMap, PointMap, gauss_beta  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint  # noqa: E402
from occ_mfd.models.forecaster import ForecastCond  # noqa: E402
from occ_mfd.objectives.freeflow import FreeFlow, take_batch  # noqa: E402
from test_mfd import MU, SIG, GaussianFlow, PointMassFlow  # noqa: E402
from test_senseflow import ConstantFlow  # noqa: E402

torch.set_num_threads(1)
D = 3
M, M2, P = [1.0, -2.0, 0.5], [0.5, 0.0, -1.0], [0.0, 1.0, 3.0]


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_predictor_residual_is_zero_for_the_exact_map_and_closed_form_otherwise(offset):
    """From the prior (s = 0): X'(z, t) = X(z, t) + t c, so Δ_G = ∂_t X' − v(X', t) = c − β(t) t c; the per-sample
    loss is w Δ_G² with w = 1/(Δ_G² + ε) (d = 1)."""
    obj = FreeFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(offset)), PointMassFlow([0.0]),
                   lambda b: (b, None))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1, generator=g, dtype=torch.float64)
    t = 0.02 + 0.98 * torch.rand(64, generator=g, dtype=torch.float64)
    per, delta, _ = obj.predictor(z, t, None)
    dg = offset * (1 - gauss_beta(t) * t)
    torch.testing.assert_close(delta[:, 0], dg, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(per.detach(), dg ** 2 / (dg ** 2 + 0.01), rtol=1e-9, atol=1e-12)


def test_corrector_gradient_is_vsd_on_the_endpoint_and_moves_toward_the_teacher():
    """Student X(z, 1) = p (PointMap); teacher and aux point masses at a and c: Δ_N = (c − a)/(1 − r) exactly, and
    d(Σ_b ⟨Δ_N, x1⟩/D)/dp = Σ_b Δ_N,b/D. With the aux on the student's own point (c = p) descent moves p to a.
    r is pinned at sigmoid(−1.4) by a vanishing std."""
    a, p = torch.tensor(M, dtype=torch.float64), torch.tensor(P, dtype=torch.float64)
    obj = FreeFlow(PointMassFlow(a), FlowMapEndpoint(PointMap(P)), PointMassFlow(P), lambda b: (b, None),
                   corrector_std=1e-12)
    per, diff = obj.corrector(torch.randn(8, D, dtype=torch.float64), None)
    r = 1 / (1 + math.exp(1.4))
    torch.testing.assert_close(diff, ((p - a) / (1 - r)).expand(8, D), rtol=1e-9, atol=1e-12)
    per.sum().backward()
    torch.testing.assert_close(obj.flow_map.p.grad, 8 * (p - a) / (1 - r) / D, rtol=1e-9, atol=0)
    assert (p - 0.1 * obj.flow_map.p.grad - a).norm() < (p - a).norm()


def test_balance_and_the_whole_updates_gradient():
    """Teacher v = m, aux v = m2, student u = p (ConstantMap): predictor Δ_G = p − m, w = 1/(‖p − m‖²/D + ε);
    corrector Δ_N = m2 − m; λ = 2 w ‖p − m‖ / ‖m2 − m‖ (the first update's EMAs are the batch values); and
    dL/dp = [n_pred·2w(p − m) + n_corr·λ(m2 − m)] / (D B)."""
    m, m2, p = (torch.tensor(v, dtype=torch.float64) for v in (M, M2, P))
    obj = FreeFlow(ConstantFlow(m), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(m2), lambda b: (b, None))
    torch.manual_seed(0)
    B = 64
    out = obj(torch.zeros(B, D, dtype=torch.float64), "student")
    out.loss.backward()
    w = 1 / (float((p - m).pow(2).sum()) / D + 0.01)
    lam = 2 * w * float((p - m).norm()) / float((m2 - m).norm())
    assert math.isclose(out.logs["corr_lambda"], lam, rel_tol=1e-6)
    n_pred = round(out.logs["predictor_share"] * B)
    assert 0 < n_pred < B
    expected = (n_pred * 2 * w * (p - m) + (B - n_pred) * lam * (m2 - m)) / (D * B)
    torch.testing.assert_close(obj.flow_map.p.grad, expected, rtol=1e-6, atol=1e-12)
    assert out.logs["nfe_jvp"] == 2 * n_pred / B and out.logs["nfe_aux"] == 1 - n_pred / B


def fixed_corrector_times(obj, r_values):
    """Pin the corrector's r: the first n of ``r_values`` for a corrector batch of n."""
    r_values = torch.as_tensor(r_values, dtype=torch.float64)
    obj.corrector_times = lambda n, device, dtype: r_values[:n].to(device=device, dtype=dtype)


def test_r_weighted_corrector_gradient_is_r_times_the_uniform_one():
    """corrector_weighting="r" (project option): point masses as above, r = 0.1, 0.5, 0.9 by hand. Per sample
    Δ_N = (p − a)/(1 − r); uniform: dL/dp = Σ_b (p − a)/(1 − r_b)/D = (p − a)(1/0.9 + 1/0.5 + 1/0.1)/D = 13.11(p − a)/D;
    r-weighted: Σ_b r_b (p − a)/(1 − r_b)/D = (p − a)(0.1/0.9 + 0.5/0.5 + 0.9/0.1)/D = 10.11(p − a)/D."""
    a, p = torch.tensor(M, dtype=torch.float64), torch.tensor(P, dtype=torch.float64)
    grads = {}
    for weighting in ("uniform", "r"):
        obj = FreeFlow(PointMassFlow(a), FlowMapEndpoint(PointMap(P)), PointMassFlow(P), lambda b: (b, None),
                       corrector_weighting=weighting)
        fixed_corrector_times(obj, [0.1, 0.5, 0.9])
        per, diff = obj.corrector(torch.randn(3, D, dtype=torch.float64), None)
        r = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        rho = r if weighting == "r" else torch.ones_like(r)
        torch.testing.assert_close(diff, rho[:, None] * (p - a) / (1 - r)[:, None], rtol=1e-9, atol=1e-12)
        per.sum().backward()
        grads[weighting] = obj.flow_map.p.grad
    torch.testing.assert_close(grads["uniform"], (1 / 0.9 + 2 + 10) * (p - a) / D, rtol=1e-9, atol=0)
    torch.testing.assert_close(grads["r"], (0.1 / 0.9 + 1 + 9) * (p - a) / D, rtol=1e-9, atol=0)


def test_r_weighted_balance_and_the_whole_updates_gradient():
    """As test_balance_and_the_whole_updates_gradient with corrector_weighting="r" and the corrector's r pinned to
    0.1, 0.2, ...: λ = 2 w ‖p − m‖ / (mean_corr r · ‖m2 − m‖) (the corrector's mean gradient norm stays the
    predictor's), and dL/dp = [n_pred·2w(p − m) + λ Σ_corr r_b (m2 − m)] / (D B). With one r for every sample the
    balance cancels the weighting: the same gradient as uniform."""
    m, m2, p = (torch.tensor(v, dtype=torch.float64) for v in (M, M2, P))
    B = 64
    r_all = 0.1 + 0.8 * torch.arange(B, dtype=torch.float64) / B
    obj = FreeFlow(ConstantFlow(m), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(m2), lambda b: (b, None),
                   corrector_weighting="r")
    fixed_corrector_times(obj, r_all)
    torch.manual_seed(0)
    out = obj(torch.zeros(B, D, dtype=torch.float64), "student")
    out.loss.backward()
    n_pred = round(out.logs["predictor_share"] * B)
    r = r_all[:B - n_pred]
    w = 1 / (float((p - m).pow(2).sum()) / D + 0.01)
    lam = 2 * w * float((p - m).norm()) / (float(r.mean()) * float((m2 - m).norm()))
    assert 0 < n_pred < B and math.isclose(out.logs["corr_lambda"], lam, rel_tol=1e-6)
    expected = (n_pred * 2 * w * (p - m) + lam * float(r.sum()) * (m2 - m)) / (D * B)
    torch.testing.assert_close(obj.flow_map.p.grad, expected, rtol=1e-6, atol=1e-12)
    grads = []
    for weighting in ("uniform", "r"):                                   # one r: weighting cancels in λ
        obj = FreeFlow(ConstantFlow(m), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(m2), lambda b: (b, None),
                       corrector_weighting=weighting)
        fixed_corrector_times(obj, torch.full((B,), 0.3, dtype=torch.float64))
        torch.manual_seed(0)
        obj(torch.zeros(B, D, dtype=torch.float64), "student").loss.backward()
        grads.append(obj.flow_map.p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-12)            # up to λ's ε = 1e-8


def test_corrector_times_spec_and_uniform():
    """The spec's r = sigmoid(N(−1.4, 1)) (mean ≈ 0.24, biased to noise) and the option r ~ U(0, 1) (mean 1/2, var
    1/12); both inside (0, 1)."""
    def make(**kw):
        return FreeFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(M2), lambda b: (b, None), **kw)
    torch.manual_seed(0)
    spec = make().corrector_times(20000, "cpu", torch.float64)
    unif = make(corrector_time="uniform").corrector_times(20000, "cpu", torch.float64)
    assert 0 < float(spec.min()) and float(spec.max()) < 1 and abs(float(spec.mean()) - 0.236) < 0.01
    assert 0 <= float(unif.min()) and float(unif.max()) < 1
    assert abs(float(unif.mean()) - 0.5) < 0.01 and abs(float(unif.var()) - 1 / 12) < 0.005


def test_it_never_reads_data_and_keeps_mfds_aux_schedule():
    """Data-free: a batch of NaNs in place of data gives a finite loss (only its shape is used); the aux learns the
    student's one-step samples 4 updates per student update (MFD's phase)."""
    torch.manual_seed(0)
    obj = FreeFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(0.2)), PointMassFlow([0.0], trainable=True),
                   lambda b: (b, None))
    out = obj(torch.full((16, 1), math.nan, dtype=torch.float64), "student")
    assert math.isfinite(float(out.loss)) and 0 < out.logs["predictor_share"] < 1
    out.loss.backward()
    assert math.isfinite(float(obj.flow_map.offset.grad))
    assert [obj.phase(i) for i in range(5)] == ["aux"] * 4 + ["student"] and obj.kind == "freeflow"


def test_take_batch():
    cond = ForecastCond(torch.arange(12.0).reshape(4, 3), torch.arange(4.0), None)
    idx = torch.tensor([3, 1])
    got = take_batch(cond, idx)
    assert torch.equal(got.past_latents, cond.past_latents[idx]) and torch.equal(got.ego, torch.tensor([3.0, 1.0]))
    assert got.prior_latents is None
    mixed = take_batch({"a": torch.arange(4), "b": (torch.tensor(7.0), "x")}, idx)
    assert torch.equal(mixed["a"], torch.tensor([3, 1])) and float(mixed["b"][0]) == 7.0 and mixed["b"][1] == "x"
    assert take_batch(None, idx) is None


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="interval input"):
        FreeFlow(ConstantFlow(M), MLPVelocity(), MLPVelocity(), lambda b: (b, None))
    with pytest.raises(ValueError, match="predictor_ratio"):
        FreeFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(M2), lambda b: (b, None),
                 predictor_ratio=1.5)
    with pytest.raises(ValueError, match="corrector_weighting must be one of"):
        FreeFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(M2), lambda b: (b, None),
                 corrector_weighting="t")
    with pytest.raises(ValueError, match="corrector_time must be one of"):
        FreeFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(M2), lambda b: (b, None),
                 corrector_time="beta")
    with pytest.raises(ValueError, match="corrector-only run has no predictor gradient"):
        FreeFlow(ConstantFlow(M), FlowMapEndpoint(ConstantMap(P)), ConstantFlow(M2), lambda b: (b, None),
                 predictor_ratio=0.0)
