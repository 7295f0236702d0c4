"""Baselines: copy-last and warp-last (static world) against hand-computed shifts and rotations."""
import math

import numpy as np
import torch

from occ_mfd.eval.baselines import CopyLast, WarpLast, copy_last, warp_last
from occ_mfd.data.records import OccBatch
from occ_mfd.grid import FREE_ID, GridSpec

G = GridSpec((-2.0, -2.0, -0.4), (2.0, 2.0, 0.4), 0.4)   # 10 × 10 × 2, symmetric about 0 in x and y
X, Y, Z = G.shape


def _past(seed=0, P=2):
    g = torch.Generator().manual_seed(seed)
    occ = torch.randint(0, 17, (1, P, X, Y, Z), generator=g)
    return torch.where(torch.rand(occ.shape, generator=g) < 0.5, torch.full_like(occ, FREE_ID), occ)


def _ego(P, poses):
    """poses: list of (dx, dy, dz, yaw) for the future frames, in the current ego frame."""
    e = torch.eye(4).repeat(1, P + len(poses), 1, 1)
    for k, (dx, dy, dz, yaw) in enumerate(poses):
        c, s = math.cos(yaw), math.sin(yaw)
        e[0, P + k, :2, :2] = torch.tensor([[c, -s], [s, c]])
        e[0, P + k, :3, 3] = torch.tensor([dx, dy, dz])
    return e


def test_copy_last_repeats_current_frame():
    past = _past()
    out = copy_last(past, 3)
    assert out.shape == (1, 3, X, Y, Z)
    for k in range(3):
        assert torch.equal(out[:, k], past[:, -1])
    b = OccBatch(past=past, future=torch.zeros(1, 3, X, Y, Z, dtype=torch.long), ego=_ego(2, [(0, 0, 0, 0)] * 3))
    assert CopyLast()(b).nfe == 0 and torch.equal(CopyLast()(b).classes, out)


def test_warp_identity_is_copy():
    past = _past(1)
    assert torch.equal(warp_last(past, _ego(2, [(0, 0, 0, 0)] * 2), G), copy_last(past, 2))


def test_warp_translation_by_one_voxel_shifts_grid():
    # Future ego 1 voxel ahead in +x: target voxel i sees the current voxel i+1; the last x slab has no source.
    past = _past(2)
    out = warp_last(past, _ego(2, [(0.4, 0, 0, 0), (0, -0.8, 0, 0)]), G)
    last = past[0, -1]
    assert torch.equal(out[0, 0, :-1], last[1:])
    assert (out[0, 0, -1] == FREE_ID).all()
    # 2 voxels toward -y: target j sees j-2; the first two y columns are free.
    assert torch.equal(out[0, 1, :, 2:], last[:, :-2])
    assert (out[0, 1, :, :2] == FREE_ID).all()


def test_warp_90_degree_yaw_rotates_grid():
    # Future ego yawed +90°: a target centre (x, y) is the current point (-y, x). With centres symmetric about 0,
    # x-index i ↔ -x is index N-1-i, so target (i, j) takes source (N-1-j, i).
    past = _past(3)
    out = warp_last(past, _ego(2, [(0, 0, 0, math.pi / 2)]), G)[0, 0].numpy()
    last = past[0, -1].numpy()
    expect = np.empty_like(last)
    for i in range(X):
        for j in range(Y):
            expect[i, j] = last[X - 1 - j, i]
    assert np.array_equal(out, expect)


def test_warp_vertical_move_and_class_wrapper():
    past = _past(4)
    b = OccBatch(past=past, future=torch.zeros(1, 1, X, Y, Z, dtype=torch.long), ego=_ego(2, [(0, 0, 0.4, 0)]))
    out = WarpLast(G)(b)
    assert out.nfe == 0
    # Ego 1 voxel up: target z-index 0 sees source z 1; target z 1 sees z 2 (outside) → free.
    assert torch.equal(out.classes[0, 0, :, :, 0], past[0, -1, :, :, 1])
    assert (out.classes[0, 0, :, :, 1] == FREE_ID).all()


def test_vae_recon_row_reads_the_future_through_the_codec():
    """vae-recon = decode(encode(future)): an identity codec gives the future exactly; a codec that maps
    everything to free predicts nothing occupied."""
    from occ_mfd.eval.baselines import VAEReconstruction

    class Identity:
        def encode(self, occ):
            return occ.float().unsqueeze(2)               # (B, T, 1, X, Y, Z) as "latents"

        def decode(self, z, prior=None):
            return z.squeeze(2).round().long()

        def decode_prior(self, batch):                    # no refiner: the decoder reads no prior
            return None

    class AllFree(Identity):
        def decode(self, z, prior=None):
            return torch.full_like(z.squeeze(2), FREE_ID).long()

    fut = _past(seed=5, P=3).long()
    batch = OccBatch(past=fut[:, :1], future=fut, ego=torch.eye(4).repeat(1, 4, 1, 1))
    out = VAEReconstruction(Identity())(batch)
    assert out.nfe == 0 and torch.equal(out.classes, fut)
    assert (VAEReconstruction(AllFree())(batch).classes == FREE_ID).all()


def test_through_vae_row_codes_the_baseline_forecast_not_the_future():
    """'<baseline>+vae' = decode(encode(baseline forecast)): the codec sees the copy-last frames (never the future);
    a codec that shifts every id by one shows that its decode is what is returned."""
    from occ_mfd.eval.baselines import CopyLast, ThroughVAE

    seen = []

    class ShiftCodec:
        def encode(self, occ):
            seen.append(occ.clone())
            return occ.float().unsqueeze(2)

        def decode(self, z, prior=None):
            return (z.squeeze(2).round().long() + 1) % 18

        def decode_prior(self, batch):
            return None

    past, fut = _past(seed=6, P=3).long(), _past(seed=7, P=2).long()
    batch = OccBatch(past=past, future=fut, ego=torch.eye(4).repeat(1, 5, 1, 1))
    row = ThroughVAE(ShiftCodec(), CopyLast())
    out = row(batch)
    assert row.name == "copy-last+vae" and row.steps == 0 and out.nfe == 0
    copied = past[:, -1:].expand(-1, 2, -1, -1, -1)
    assert torch.equal(seen[0], copied)                       # the baseline's forecast went in
    assert torch.equal(out.classes, (copied + 1) % 18)        # the codec's decode came out
