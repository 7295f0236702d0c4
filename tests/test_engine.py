"""Engine units: LR schedule, EMA, builder, weight-decay split, non-finite guard, phase alternation."""
import json
import math

import pytest
import torch
from torch import nn

from occ_mfd.builder import build
from occ_mfd.engine.checkpoint import load_checkpoint
from occ_mfd.engine.ema import EMA
from occ_mfd.engine.loop import NonFiniteError, train
from occ_mfd.engine.optim import build_optimizers
from occ_mfd.engine.schedule import lr_factor
from occ_mfd.engine.toys import ToyRegression

torch.set_num_threads(1)


def toy_cfg(**train_kw):
    obj = train_kw.pop("objective", {})
    return dict(data=dict(type="occ_mfd.engine.toys.ToyRegressionDataset", n=16, dim=4),
                objective=dict(type="occ_mfd.engine.toys.ToyRegression", dim=4, **obj),
                optim=train_kw.pop("optim", dict(main=dict(lr=1e-2, weight_decay=0.01))),
                train={**dict(batch_size=4, log_interval=1, ckpt_interval=100, tensorboard=False), **train_kw})


def test_lr_schedule_values():
    f = lambda s: lr_factor(s, max_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.2)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)                                   # cosine starts at 1
    assert f(35) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 4)))
    assert f(60) == pytest.approx(0.6)                                   # half way: (1 + 0.2) / 2
    assert f(110) == pytest.approx(0.2) and f(500) == pytest.approx(0.2)
    assert lr_factor(3, 100, 10, "constant") == pytest.approx(0.4)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert lr_factor(0, 100, 0, "cosine", 0.0) == 1.0 and lr_factor(100, 100, 0, "cosine", 0.0) == pytest.approx(0)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "linear")


@pytest.mark.parametrize("decay,k,prod", [
    (0.9999, 5, 1 / math.comb(14, 9)),                  # prod_{n<k} (1+n)/(10+n) = 1 / C(k+9, 9)
    (0.5, 12, 1 / math.comb(17, 9) * 0.5 ** 4),         # warm-up factors for n < 8, then 0.5 four times
])
def test_ema_closed_form(decay, k, prod):
    m = nn.Linear(3, 2)
    s0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.full_like(p, 2.0))
    ema = EMA({"m": m}, decay)
    ema.shadow["m"] = {k_: v.clone() for k_, v in s0.items()}      # start the average at the old weights
    for _ in range(k):
        ema.update()
    # s_k = θ + (s_0 − θ) · prod_n d_n for constant θ.
    for name, s in ema.shadow["m"].items():
        torch.testing.assert_close(s, 2.0 + (s0[name] - 2.0) * prod, rtol=1e-5, atol=1e-6)
    assert ema.num_updates["m"] == k


def test_builder_rules():
    lin = build(dict(type=nn.Linear, in_features=2, out_features=3))
    assert isinstance(lin, nn.Linear) and lin.out_features == 3
    nested = build(dict(type="torch.nn.ModuleList",
                        modules=[dict(type="torch.nn.Linear", in_features=1, out_features=1), dict(type=nn.ReLU)]))
    assert isinstance(nested[0], nn.Linear) and isinstance(nested[1], nn.ReLU)
    with pytest.raises(ValueError, match="both"):
        build(dict(type=nn.Linear, in_features=2, out_features=3), in_features=4)
    with pytest.raises(ImportError, match="no attribute"):
        build(dict(type="torch.nn.NoSuchLayer"))
    with pytest.raises(ValueError, match="dotted"):
        build(dict(type="Linear"))


def test_no_weight_decay_on_norms_biases_embeddings():
    obj = ToyRegression(dim=4)
    opt = build_optimizers(obj, {"main": {"lr": 1e-3, "weight_decay": 0.1}})["main"]
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    net = obj.net
    assert wd[id(net.lin.weight)] == 0.1
    for p in (net.lin.bias, net.norm.weight, net.norm.bias, net.pos_emb):
        assert wd[id(p)] == 0.0
    with pytest.raises(KeyError, match="missing"):
        build_optimizers(obj, {"other": {"lr": 1.0}})


def _params(ckpt, prefix):
    return {k: v for k, v in ckpt["objective"].items() if k.startswith(prefix)}


def test_phase_alternation_steps_only_that_group(tmp_path):
    cfg = toy_cfg(max_steps=3, ckpt_interval=1, keep_ckpts=0, ema_decay=0.9, warmup_steps=0,
                  objective=dict(two_phase=True, ratio=3),
                  optim=dict(aux=dict(lr=1e-2), student=dict(lr=1e-2)))
    train(cfg, tmp_path)
    c1, c2, c3 = (load_checkpoint(tmp_path / f"ckpt_{s:07d}.pt") for s in (1, 2, 3))
    # step index 1 is "aux": student unchanged, aux changed; index 2 is "student": the reverse.
    for k, v in _params(c1, "net.").items():
        assert torch.equal(v, c2["objective"][k])
    assert any(not torch.equal(v, c2["objective"][k]) for k, v in _params(c1, "aux.").items())
    for k, v in _params(c2, "aux.").items():
        assert torch.equal(v, c3["objective"][k])
    assert any(not torch.equal(v, c3["objective"][k]) for k, v in _params(c2, "net.").items())
    assert int(c3["optimizers"]["aux"]["state"][0]["step"]) == 2
    assert int(c3["optimizers"]["student"]["state"][0]["step"]) == 1
    assert c2["ema"]["num_updates"]["student"] == 0 and c3["ema"]["num_updates"]["student"] == 1
    phases = [json.loads(line)["phase"] for line in open(tmp_path / "log.jsonl")]
    assert phases == ["aux", "aux", "student"]


def test_nonfinite_step_is_skipped(tmp_path):
    # constant lr: the lr of steps 0 and 1 must not depend on max_steps
    train(toy_cfg(max_steps=2, schedule="constant"), tmp_path / "a")
    train(toy_cfg(max_steps=3, schedule="constant", objective=dict(nonfinite_from=2, nonfinite_until=3)),
          tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a/latest.pt"), load_checkpoint(tmp_path / "b/latest.pt")
    for k, v in a["objective"].items():
        assert torch.equal(v, b["objective"][k]), k           # the NaN step changed nothing
    assert b["guard"] == {"consecutive": 1, "skipped": 1}
    skipped = [json.loads(line)["skipped"] for line in open(tmp_path / "b/log.jsonl")]
    assert skipped == [0.0, 0.0, 1.0]


def test_persistent_nonfinite_stops_with_message(tmp_path):
    cfg = toy_cfg(max_steps=20, ckpt_interval=2, max_nonfinite=4, objective=dict(nonfinite_from=3))
    with pytest.raises(NonFiniteError) as e:
        train(cfg, tmp_path)
    msg = str(e.value)
    # steps 3, 4, 5, 6 are non-finite; the 4th in a row (step 6) stops; ckpt 6 holds the good weights.
    assert "step 6" in msg and "4 consecutive" in msg and str(tmp_path / "ckpt_0000006.pt") in msg
    good = load_checkpoint(tmp_path / "ckpt_0000002.pt")["objective"]
    last = load_checkpoint(tmp_path / "ckpt_0000006.pt")["objective"]
    assert all(torch.isfinite(v).all() for v in last.values())
    assert not all(torch.equal(good[k], last[k]) for k in good)         # step index 2 updated (call 2 < 3)
