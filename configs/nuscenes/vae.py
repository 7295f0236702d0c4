# Full-scale occupancy VAE (OccFM): 200×200×16 Occ3D grid → 16 × 50 × 50 latent; 15.87 M parameters.
# Residual conv stages replace OccFM's Swin stages (see occ_mfd/models/vae.py). The encoder starts with a 3-D stem
# over occupied voxels only (stem3d_channels; ~6 % of Occ3D's voxels): spconv when a spconv build that fits torch
# is installed (sparse="auto"), else its dense twin, the same function with the same parameters
# (occ_mfd/models/sparse.py; sparse=True makes a missing or mismatched spconv an error).
#   python tools/train.py configs/nuscenes/vae.py --cfg-options data.root=data/occ
#   torchrun --nproc_per_node=8 tools/train.py configs/nuscenes/vae.py
_base_ = ["../_base_/train_defaults.py"]

data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ", split="train",
            past=4, future=6, pool=1, mask=None, stride=1)
objective = dict(
    type="occ_mfd.objectives.vae.VAEObjective",
    vae=dict(type="occ_mfd.models.vae.OccVAE", num_classes=18, grid_z=16, class_dim=8, height_dim=4,
             channels=(128, 256, 512), num_res_blocks=1, latent_channels=16, downsample=4,
             stem3d_channels=16, sparse="auto"),
    max_frames=None,
)
optim = dict(main=dict(lr=1e-4, weight_decay=0.01, grad_clip=5.0))
train = dict(max_steps=100_000, batch_size=1, num_workers=4, warmup_steps=1000, ema_decay=0.9999,
             amp="bf16", ckpt_interval=5000)
