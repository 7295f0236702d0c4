"""The decoder-side ego-motion prior (occ_mfd/models/prior_refiner.py): identity at initialisation, a correction
that reads the prior voxel by voxel, and clear errors."""
import pytest
import torch

from occ_mfd.models.prior_refiner import PriorRefiner


def test_untrained_refiner_returns_the_logits_exactly():
    torch.manual_seed(0)
    ref = PriorRefiner(num_classes=5, grid_z=3, hidden=8, class_dim=4)
    logits = torch.randn(2, 5, 6, 4, 3)
    prior = torch.randint(0, 5, (2, 6, 4, 3))
    assert torch.equal(ref(logits, prior), logits)


def test_refiner_learns_to_copy_the_prior_where_the_logits_know_nothing():
    """Uniform logits (the VAE lost the detail) + a correct prior: 600 Adam steps on CE make the refined
    argmax equal the prior; the layout of the fold (height ↔ channels) must be right for that to work per voxel."""
    torch.manual_seed(0)
    K, Z = 4, 3
    ref = PriorRefiner(num_classes=K, grid_z=Z, hidden=16, class_dim=4)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(600):
        prior = torch.randint(0, K, (4, 8, 8, Z))
        out = ref(torch.zeros(4, K, 8, 8, Z), prior)
        loss = torch.nn.functional.cross_entropy(out, prior)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior = torch.randint(0, K, (2, 8, 8, Z))
    assert (ref(torch.zeros(2, K, 8, 8, Z), prior).argmax(1) == prior).float().mean() > 0.99


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="prior must be one of"):
        PriorRefiner(prior="oracle")
    ref = PriorRefiner(num_classes=5, grid_z=3, hidden=8)
    with pytest.raises(ValueError, match="must be"):
        ref(torch.zeros(1, 5, 4, 4, 3), torch.zeros(1, 4, 4, 2, dtype=torch.long))


# ---------------------------------------------------------------- the refiner stage, its snapshot and the pipeline
def _refiner_stage(tmp_path):
    """A tiny VAE snapshot → PriorRefinerObjective on a one-scene dataset (grid 10 × 10 × 2, moving ego)."""
    import sys
    from pathlib import Path

    from occ_mfd.builder import build
    from occ_mfd.data.records import collate_sequences
    from occ_mfd.data.sequences import OccSequenceDataset
    from occ_mfd.models.snapshot import InferenceParts, save_snapshot, snapshot_from_parts
    from occ_mfd.objectives.prior_refiner import PriorRefinerObjective

    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_runner import G, make_dataset

    torch.manual_seed(0)
    vae = build(dict(type="occ_mfd.models.vae.OccVAE", grid_z=2, channels=(8, 16), latent_channels=2, downsample=2,
                     sparse=False))
    meta = dict(grid=G.to_dict(), data={"pool": 1, "past": 4, "future": 6}, git_rev="test")
    vae_path = save_snapshot(snapshot_from_parts(InferenceParts("vae", {"vae": vae}), **meta), tmp_path / "vae.pt")
    data = make_dataset(tmp_path / "data", static=False, n_frames=11)
    ds = OccSequenceDataset(data, "val", past=4, future=6, mask=None)
    batch = collate_sequences([ds[0]])
    obj = PriorRefinerObjective(refiner=dict(hidden=8, class_dim=4), vae_snapshot=str(vae_path), frames=2)
    return obj, batch, meta, vae_path


def test_refiner_objective_trains_only_the_refiner_and_snapshots_both(tmp_path):
    from occ_mfd.ego_motion import prior_frames
    from occ_mfd.models.snapshot import load_snapshot, save_snapshot, snapshot_from_parts

    obj, batch, meta, _ = _refiner_stage(tmp_path)
    assert obj.param_groups()["main"] == list(obj.refiner.parameters())
    assert not any(p.requires_grad for p in obj.vae.parameters())
    out = obj(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in obj.refiner.parameters())
    # an untrained refiner is the identity: the refined and the plain decodings score the same on the batch
    assert out.logs["recon_miou"] == out.logs["vae_recon_miou"]
    snap = load_snapshot(save_snapshot(snapshot_from_parts(obj.inference_parts(), **meta), tmp_path / "r.pt"))
    assert snap.kind == "vae" and set(snap.networks) == {"vae", "refiner"}
    with torch.no_grad():
        for p in obj.refiner.net[-1].parameters():
            p.normal_(0, 0.5)                           # a trained refiner changes the decoding ...
    snap = load_snapshot(save_snapshot(snapshot_from_parts(obj.inference_parts(), **meta), tmp_path / "r.pt"))
    snap.latent_scale = 1.0
    codec = snap.codec()
    z = codec.encode(batch.future)
    prior = prior_frames(batch.past, batch.ego, batch.grid, "cv-warp")
    assert torch.equal(codec.decode_prior(batch), prior)
    plain = codec.vae.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2])
    refined = codec.decode_logits(z, prior)
    assert torch.allclose(refined, obj.refiner(plain.flatten(0, 1), prior.flatten(0, 1)).unflatten(0, z.shape[:2]))
    assert not torch.allclose(refined, plain)           # ... and the snapshot's codec applies it
    with pytest.raises(ValueError, match="reads the ego-motion prior"):
        codec.decode_logits(z)                          # no prior voxels: a clear error, not a silent plain decode


def test_teacher_on_a_refiner_snapshot_decodes_with_the_prior(tmp_path):
    """The teacher stage takes the refiner stage's snapshot as its VAE: its snapshot carries the refiner and its
    pipeline's forecast is the refined decoding of the sampled latents."""
    from occ_mfd.models.pipeline import OccForecastPipeline
    from occ_mfd.models.snapshot import load_snapshot, save_snapshot, snapshot_from_parts
    from occ_mfd.objectives.flow_matching import OccFlowTeacher

    obj, batch, meta, _ = _refiner_stage(tmp_path)
    with torch.no_grad():
        for p in obj.refiner.net[-1].parameters():
            p.normal_(0, 0.5)
    ref_path = save_snapshot(snapshot_from_parts(obj.inference_parts(), **meta), tmp_path / "ref.pt")
    net = dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(), heads=1,
               mid_attn=False, prior="cv-warp")
    teacher = OccFlowTeacher(net=net, vae_snapshot=str(ref_path), latent_scale=1.0, steps=2)
    assert teacher.codec.refiner is not None
    snap = load_snapshot(save_snapshot(snapshot_from_parts(teacher.inference_parts(), **meta), tmp_path / "t.pt"))
    assert set(snap.networks) == {"vae", "refiner", "net"}
    pipe = snap.pipeline()
    g = torch.Generator().manual_seed(3)
    fc = pipe.forecast(batch, generator=g)
    cond = pipe.encode(batch)
    expect = pipe.codec.decode(fc.latents, cond.decode_prior)
    assert torch.equal(fc.classes, expect)
    assert not torch.equal(fc.classes, pipe.codec.vae.decode(fc.latents.flatten(0, 1)).argmax(1)
                           .unflatten(0, fc.latents.shape[:2]).to(torch.uint8))
    # a refiner that reads the future poses ("warp") is refused for a past-conditioned forecaster
    pipe.codec.refiner.prior = "warp"
    with pytest.raises(ValueError, match="past trajectory"):
        OccForecastPipeline(pipe.codec, pipe.net)
    with pytest.raises(ValueError, match="past trajectory"):
        pipe.attach_refiner(pipe.codec.refiner)          # attaching one later (tools/eval.py --refiner): same check


def _teacher_snapshot(tmp_path, vae_path, meta):
    from occ_mfd.models.snapshot import save_snapshot, snapshot_from_parts
    from occ_mfd.objectives.flow_matching import OccFlowTeacher

    torch.manual_seed(1)
    net = dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(), heads=1,
               mid_attn=False, prior="cv-warp")
    teacher = OccFlowTeacher(net=net, vae_snapshot=str(vae_path), latent_scale=1.0, steps=2, cfg_scale=1.5)
    with torch.no_grad():             # a net that moves the latents (a zero-initialised output layer would not)
        for p in teacher.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_snapshot(snapshot_from_parts(teacher.inference_parts(), **meta), tmp_path / "teacher.pt")


@pytest.mark.parametrize("steps", [1, 2])
def test_refiner_on_forecasts_decodes_the_forecasters_own_forecast(tmp_path, steps):
    """forecaster_snapshot: the logits the refiner corrects are the VAE decoding of the forecaster's sampled
    forecast of the window (same noise, same step count) — scored on the batch, they equal the pipeline's own
    forecast's score for the picked frames — and the refiner it writes attaches to that forecaster."""
    import sys
    from pathlib import Path

    from occ_mfd.models.snapshot import load_snapshot, save_snapshot, snapshot_from_parts
    from occ_mfd.objectives.prior_refiner import PriorRefinerObjective
    from occ_mfd.scores import confusion_matrix, iou_from_confusion

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from eval import attach_refiner

    _, batch, meta, vae_path = _refiner_stage(tmp_path)
    t_path = _teacher_snapshot(tmp_path, vae_path, meta)
    obj = PriorRefinerObjective(refiner=dict(hidden=8, class_dim=4), forecaster_snapshot=str(t_path), frames=3,
                                forecast_steps=(steps,))
    assert obj.param_groups()["main"] == list(obj.refiner.parameters())
    torch.manual_seed(5)
    out = obj(batch)
    out.loss.backward()
    assert all(p.grad is not None for p in obj.refiner.parameters())
    assert not any(p.grad is not None for p in obj.forecaster.parameters())

    pipe = load_snapshot(t_path).pipeline()
    B, F = batch.future.shape[:2]
    torch.manual_seed(5)                                   # the objective's draws, in its order
    pick = torch.stack([torch.randperm(F)[:3] for _ in range(B)])
    torch.randint(1, ())                                   # the step count's draw (one choice here)
    fc = pipe.forecast(batch, steps=steps)
    rows = torch.arange(B)[:, None]
    conf = confusion_matrix(fc.classes[rows, pick].flatten(0, 1), batch.future[rows, pick].flatten(0, 1).long(),
                            pipe.codec.vae.num_classes)
    iou, _, miou = iou_from_confusion(conf, pipe.codec.vae.free_id)
    assert out.logs["vae_recon_iou"] == pytest.approx(iou / 100) and out.logs["vae_recon_miou"] == pytest.approx(miou / 100)
    # the true future's own decoding scores differently: the logits really are the forecast's
    z = pipe.codec.vae.encode(batch.future[rows, pick].flatten(0, 1).long()).mean
    conf_true = confusion_matrix(pipe.codec.vae.decode(z).argmax(1), batch.future[rows, pick].flatten(0, 1).long(),
                                 pipe.codec.vae.num_classes)
    assert iou_from_confusion(conf_true, pipe.codec.vae.free_id)[0] != pytest.approx(iou)

    ref_path = save_snapshot(snapshot_from_parts(obj.inference_parts(), **meta), tmp_path / "ref.pt")
    loaded = {str(t_path): (pipe, None)}
    attach_refiner(str(ref_path), loaded)                  # same VAE weights: accepted
    assert pipe.codec.refiner is not None


def test_refiner_on_forecasts_bad_inputs(tmp_path):
    from occ_mfd.objectives.prior_refiner import PriorRefinerObjective

    _, _, meta, vae_path = _refiner_stage(tmp_path)
    t_path = _teacher_snapshot(tmp_path, vae_path, meta)
    with pytest.raises(ValueError, match="not both"):
        PriorRefinerObjective(vae_snapshot=str(vae_path), forecaster_snapshot=str(t_path))
    with pytest.raises(ValueError, match="forecast_steps"):
        PriorRefinerObjective(forecaster_snapshot=str(t_path), forecast_steps=(0,))
    with pytest.raises(ValueError, match="kind"):
        PriorRefinerObjective(forecaster_snapshot=str(vae_path))
