"""A small prepared dataset on disk (Occ3D layout + index.json) for stage tests: a flat road with a box
that moves one voxel per frame, so sequences are non-trivial yet predictable; and the three training stages
(VAE → teacher → MFD, 2 steps each) trained on it through the real engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmengine.config import Config

from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels
from occ_mfd.engine.loop import train
from occ_mfd.grid import FREE_ID, GridSpec

STAGE_GRID = GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, 2.2), 0.8)  # 20 × 20 × 4
TRAIN = dict(batch_size=1, num_workers=0, warmup_steps=0, ema_decay=0.9, amp=None, log_interval=1,
             ckpt_interval=100, keep_ckpts=1, seed=0, max_nonfinite=5, tensorboard=False)


def make_prepared(root: Path, grid: GridSpec, scenes=(("scene-a", "train"), ("scene-b", "val")),
                  frames: int = 11) -> Path:
    X, Y, Z = grid.shape
    entries = []
    for si, (name, split) in enumerate(scenes):
        fr = []
        for k in range(frames):
            sem = np.full((X, Y, Z), FREE_ID, np.uint8)
            sem[:, :, 0] = 11                                    # driveable surface
            x0 = (2 * k + 3 * si) % (X - 4)
            sem[x0:x0 + 3, Y // 2:Y // 2 + 2, 1:3] = 4           # a car moving along +x
            sem[:, -2:, 1:Z] = 15                                # a wall
            token = f"{name}-{k:03d}"
            write_labels(labels_path(root, name, token), OccFrame(sem, np.ones_like(sem), np.ones_like(sem)),
                         grid)
            pose = np.eye(4)
            pose[0, 3] = 2.0 * k
            fr.append(FrameEntry(token=token, timestamp=1_000_000 + 500_000 * k, ego2global=pose))
        entries.append(SceneEntry(name=name, split=split, frames=fr))
    save_index(root, DatasetIndex(grid=grid, scenes=entries, source={"kind": "test"}))
    return root


def stage_config(data_root, objective, optim, steps):
    return Config(dict(
        data=dict(type="occ_mfd.data.sequences.OccSequenceDataset", root=str(data_root), split="train",
                  past=4, future=6, pool=1, mask=None),
        objective=objective, optim=optim, train=dict(TRAIN, max_steps=steps)))


def train_tiny_stages(tmp: Path) -> tuple[Path, Path]:
    """Train VAE → teacher → MFD (2 steps each) in ``tmp/{vae,teacher,mfd}``; → (tmp, prepared data root)."""
    data = make_prepared(tmp / "occ", STAGE_GRID)
    opt = dict(main=dict(lr=1e-3, weight_decay=0.0, grad_clip=1.0))
    vae = dict(type="occ_mfd.objectives.vae.VAEObjective", max_frames=2,
               vae=dict(type="occ_mfd.models.vae.OccVAE", grid_z=4, channels=(8, 8, 8), latent_channels=4,
                        downsample=2, sparse=False))
    train(stage_config(data, vae, opt, 2), tmp / "vae")
    teacher = dict(type="occ_mfd.objectives.flow_matching.OccFlowTeacher", vae_snapshot=str(tmp / "vae"),
                   net=dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                            attn_levels=(), heads=1), cfg_scale=2.0)
    train(stage_config(data, teacher, opt, 2), tmp / "teacher")
    mfd = dict(type="occ_mfd.objectives.mfd.OccMeanFlowDistillation",
               teacher_snapshot=str(tmp / "teacher/snapshot.pt"), max_substep=0.25, aux_steps=1, student_steps=1)
    mopt = dict(aux=dict(lr=1e-3, grad_clip=1.0), student=dict(lr=1e-3, grad_clip=1.0))
    train(stage_config(data, mfd, mopt, 2), tmp / "mfd")
    return tmp, data
