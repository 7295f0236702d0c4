"""Occupancy VAE: fixed height embedding, KL closed form, decoder weight tying, and a real overfit check."""
import math

import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.models.vae import LatentDist, OccVAE
from occ_mfd.models.vae_loss import VAELoss
from occ_mfd.objectives.vae import VAEObjective
from occ_mfd.scores import confusion_matrix, iou_from_confusion


def test_height_embedding_is_fixed_sincos():
    vae = OccVAE(grid_z=8, channels=(8, 16), latent_channels=2, downsample=2)
    # dim 4 → ω = (1, 10000^(-1/2)) ; emb(z) = [sin z, sin 0.01 z, cos z, cos 0.01 z]
    for z in range(8):
        expected = [math.sin(z), math.sin(0.01 * z), math.cos(z), math.cos(0.01 * z)]
        assert vae.height_embed[z].tolist() == pytest.approx(expected, abs=1e-6)
    occ = torch.randint(0, 18, (1, 4, 4, 8))
    feats = vae.voxel_features(occ)
    assert torch.equal(feats[0, 2, 3, 5, 8:], vae.height_embed[5])
    assert torch.equal(feats[0, 2, 3, 5, :8], vae.class_embed.weight[occ[0, 2, 3, 5]])
    assert "height_embed" not in vae.state_dict()  # fixed, not learned


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    d = LatentDist(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g))
    q = torch.distributions.Normal(d.mean, d.std)
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(d.kl(), ref, atol=1e-5)


def test_decoder_logits_are_dot_products_with_class_embeddings():
    torch.manual_seed(0)
    vae = OccVAE(grid_z=4, channels=(8, 16), latent_channels=2, downsample=2)
    z = torch.randn(1, 2, 4, 4)
    logits = vae.decode(z)                                           # (1, 18, 8, 8, 4)
    with torch.no_grad():
        vae.class_embed.weight[3] *= 2.0                             # only class 3's logits double
    logits2 = vae.decode(z)
    assert torch.allclose(logits2[:, 3], 2 * logits[:, 3], atol=1e-5)
    assert torch.allclose(logits2[:, 4], logits[:, 4], atol=1e-6)


def test_bad_shapes_raise():
    vae = OccVAE(grid_z=4, channels=(8, 16), latent_channels=2, downsample=2)
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 7, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="grid_z|expected"):
        vae.encode(torch.zeros(1, 8, 8, 5, dtype=torch.long))


def batch_iou_miou(pred, target):
    iou, _, miou = iou_from_confusion(confusion_matrix(pred, target))
    return iou / 100, miou / 100


def test_batch_iou_miou_hand_case():
    t = torch.tensor([0, 0, 1, 17, 17, 255])
    p = torch.tensor([0, 1, 1, 17, 0, 3])              # the last voxel is ignored (target 255)
    iou, miou = batch_iou_miou(p, t)
    assert iou == pytest.approx(3 / 4)                 # occupied: pred {0,1,2,4}, gt {0,1,2}
    assert miou == pytest.approx((1 / 3 + 1 / 2) / 2)  # class 0: 1/3 ; class 1: 1/2


def _toy_frame(X=16, Y=16, Z=8):
    occ = torch.full((X, Y, Z), 17)
    occ[:, :, 0] = 11
    occ[2:7, 3:8, 1:3] = 4
    occ[9:15, 1:4, 1:6] = 15
    occ[10:12, 10:12, 1:4] = 7
    occ[4:6, 12:15, 1:2] = 1
    return occ


def test_tiny_vae_overfits_one_frame():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        occ = _toy_frame()[None]
        vae = OccVAE(grid_z=8, channels=(32, 64, 64), latent_channels=8, downsample=4)
        opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
        loss_fn = VAELoss()
        for _ in range(300):
            logits, dist = vae(occ)
            terms = loss_fn(logits, occ, dist)
            opt.zero_grad()
            terms.total.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                pred = vae.decode(vae.encode(occ).mean).argmax(1)
            if (pred == occ).float().mean() >= 0.999:
                break
    finally:
        torch.set_num_threads(n)
    assert (pred == occ).float().mean() >= 0.99
    iou, miou = batch_iou_miou(pred, occ)
    assert iou >= 0.95 and miou >= 0.9   # every class, incl. the small ones, reconstructed


def test_vae_objective_flattens_frames_and_logs():
    torch.manual_seed(0)
    vae = OccVAE(grid_z=4, channels=(8, 16), latent_channels=2, downsample=2)
    B, P, Fn = 2, 2, 3
    batch = OccBatch(past=torch.randint(0, 18, (B, P, 8, 8, 4)), future=torch.randint(0, 18, (B, Fn, 8, 8, 4)),
                     ego=torch.eye(4).expand(B, P + Fn, 4, 4))
    seen = []
    vae.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = VAEObjective(vae)(batch)
    assert seen == [B * (P + Fn)]
    assert set(out.logs) >= {"ce", "lovasz", "kl", "recon_iou", "recon_miou"}
    assert 0.0 <= out.logs["recon_iou"] <= 1.0 and 0.0 <= out.logs["recon_miou"] <= 1.0   # fractions
    assert out.loss.item() == pytest.approx(10 * out.logs["ce"].item() + out.logs["lovasz"].item()
                                            + 1e-3 * out.logs["kl"].item(), rel=1e-5)
    assert VAEObjective(vae).ema_modules()["vae"] is vae


def test_enet_class_weights_hand_case():
    # Labelled voxels: class 0 ×3, class 2 ×1 (255 is ignored) → shares 0.75, 0, 0.25, 0 of 4 classes.
    from occ_mfd.models.vae_loss import enet_class_weights
    target = torch.tensor([0, 0, 0, 2, 255, 255])
    w = enet_class_weights(target, 4)
    expect = torch.tensor([1 / math.log(1.02 + 0.75), 1 / math.log(1.02), 1 / math.log(1.02 + 0.25),
                           1 / math.log(1.02)])
    assert torch.allclose(w, expect, rtol=1e-6)
    assert w.max() / w.min() <= 1 / math.log(1.02) * math.log(2.02) + 1e-6    # the documented bound on ratios


def test_class_balanced_ce_is_the_weighted_mean_over_voxels():
    torch.manual_seed(0)
    K = 4
    logits = torch.randn(1, K, 3, 2, 1)
    target = torch.tensor([[0, 0, 0], [0, 2, 255]]).T.reshape(1, 3, 2, 1)    # 4 × class 0, 1 × class 2, 1 ignored
    dist = LatentDist(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    plain = VAELoss(lovasz_weight=0.0)(logits, target, dist).ce
    balanced = VAELoss(lovasz_weight=0.0, class_balance=True)(logits, target, dist).ce
    # Hand: per-voxel CE, weighted by 1 / ln(1.02 + share of its class), divided by the summed weights.
    logp = logits.log_softmax(1)[0, :, :, :, 0]                              # (K, 3, 2)
    t = target[0, :, :, 0]
    ces, ws = [], []
    for i in range(3):
        for j in range(2):
            if t[i, j] == 255:
                continue
            share = {0: 0.8, 2: 0.2}[int(t[i, j])]
            ces.append(-logp[t[i, j], i, j])
            ws.append(1 / math.log(1.02 + share))
    ces, ws = torch.stack(ces), torch.tensor(ws)
    assert torch.allclose(plain, ces.mean(), atol=1e-6)
    assert torch.allclose(balanced, (ws * ces).sum() / ws.sum(), atol=1e-6)
    assert not torch.allclose(plain, balanced, atol=1e-4)   # the weighting changes the loss
